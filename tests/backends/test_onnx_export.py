"""Merged and separate-adapter ONNX export, checked against torch in ONNX Runtime."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers.export import base_out, shapes, torch_out, train_steps, transformed

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx import export as lo
from lowrank_compiler.errors import ExportError

TOL = 1e-4


def _feeds(ids, mask):
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _dims(model, name):
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name == name:
            return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    raise KeyError(name)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_merged_and_separate_onnx_match_torch_at_two_shapes(kind, tmp_path):
    gm, ids, mask = transformed(kind)
    report = lrc.export(gm, tmp_path / "m.onnx", merge=True)
    assert report["max_abs_diff"] <= TOL
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert _dims(model, "input_ids") == ["batch", "seq"]
    assert not report["lora_inputs"] and not report["adapters"]
    rep_s = lrc.export(gm, tmp_path / "s.onnx", adapters_dir=tmp_path, validate=False)
    assert len(rep_s["lora_inputs"]) == 2 * len(lrc.adapters(gm))
    merged, sep = lo.session(tmp_path / "m.onnx", providers="cpu"), lo.session(tmp_path / "s.onnx", providers="cpu")
    for ids2, mask2 in shapes():
        ref, base = torch_out(gm, ids2, mask2), base_out(gm, ids2, mask2)
        feeds = _feeds(ids2, mask2)
        got = merged(feeds)[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= TOL
        assert np.abs(sep(feeds, adapter=tmp_path / "s.onnx_adapter")[0] - ref).max() <= TOL
        assert np.abs(sep(feeds)[0] - base).max() <= TOL
        assert np.abs(base - ref).max() > 1e-2  # the adapters matter


@pytest.fixture(scope="module")
def bert_two(tmp_path_factory):
    """A bert with adapter task_a exported separate, plus task_b (trained on other data) converted."""
    d = tmp_path_factory.mktemp("two")
    gm, ids, mask = transformed("bert")
    train_steps(gm, ids, mask, seed=10)
    lrc.save_adapters(gm, d / "task_b.safetensors")
    gm_b = copy.deepcopy(gm)
    train_steps(gm, ids, mask, seed=11)
    report = lrc.export(gm, d / "model.onnx", adapters_dir=d / "ad", adapter_name="task_a",
                        extra_adapters=[str(d / "task_b.safetensors")])
    return gm, gm_b, ids, mask, d, report


@pytest.mark.slow
def test_two_adapters_one_session(bert_two):
    """Two adapters trained on different data, one session: each matches torch; none = base."""
    gm, gm_b, _, _, d, report = bert_two
    assert report["max_abs_diff"] <= TOL
    assert sorted(p.split("/")[-1] for p in report["adapters"]) == ["task_a.onnx_adapter", "task_b.onnx_adapter"]
    sess = lo.session(d / "model.onnx", providers="cpu")
    assert set(sess.input_names) == {"input_ids", "attention_mask"}
    assert len(sess.lora_inputs()) == 2 * len(lrc.adapters(gm))
    for ids2, mask2 in shapes():
        ref_a, ref_b, ref_base = torch_out(gm, ids2, mask2), torch_out(gm_b, ids2, mask2), base_out(gm, ids2, mask2)
        assert np.abs(ref_a - ref_b).max() > 1e-2
        feeds = _feeds(ids2, mask2)
        for adapter, ref in (("task_a", ref_a), (None, ref_base), ("task_b", ref_b), ("task_a", ref_a)):
            path = None if adapter is None else d / "ad" / f"{adapter}.onnx_adapter"
            assert np.abs(sess(feeds, adapter=path)[0] - ref).max() <= TOL, adapter


@pytest.mark.slow
def test_separate_model_inputs_are_overridable_with_r0_defaults(bert_two):
    gm, _, _, _, d, _ = bert_two
    model = onnx.load(str(d / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    site = "encoder.layer.0.attention.self.query"
    assert _dims(model, f"{site}.lora_A.weight") == [32, f"{site}.lora_r"]
    assert _dims(model, f"{site}.lora_B.weight") == [f"{site}.lora_r", 32]
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    assert inits[f"{site}.lora_A.weight"] == [32, 0] and inits[f"{site}.lora_B.weight"] == [0, 32]
    tensors = lo.read_onnx_adapter(d / "ad" / "task_a.onnx_adapter")
    a = lrc.adapters(gm)[site]
    np.testing.assert_allclose(tensors[f"{site}.lora_A.weight"], a.lora_A.detach().t().numpy())
    np.testing.assert_allclose(tensors[f"{site}.lora_B.weight"], (a.lora_B * a.scaling).detach().t().numpy(), rtol=1e-6)


@pytest.mark.slow
def test_minilm_merged_and_separate(minilm, minilm_batch, tmp_path):
    model, _ = minilm
    ids, mask = minilm_batch
    gm = lrc.transform(model, "attention.self.query:lora(r=8, alpha=16); attention.self.value:lora(r=8, alpha=16)",
                       (ids,), {"attention_mask": mask})
    train_steps(gm, ids, mask, seed=3, steps=2)
    rep_m = lrc.export(gm, tmp_path / "m.onnx", merge=True)
    rep_s = lrc.export(gm, tmp_path / "s.onnx", adapters_dir=tmp_path)
    assert rep_m["max_abs_diff"] <= TOL and rep_s["max_abs_diff"] <= TOL
    ids2, mask2 = ids.repeat(2, 2)[:5, :24], mask.repeat(2, 2)[:5, :24]
    ref = torch_out(gm, ids2, mask2)
    assert np.abs(lo.session(tmp_path / "m.onnx", "cpu")(_feeds(ids2, mask2))[0] - ref).max() <= TOL
    sess = lo.session(tmp_path / "s.onnx", "cpu")
    assert np.abs(sess(_feeds(ids2, mask2), adapter=tmp_path / "s.onnx_adapter")[0] - ref).max() <= TOL
    assert np.abs(sess(_feeds(ids2, mask2))[0] - base_out(gm, ids2, mask2)).max() <= TOL


@pytest.mark.slow
def test_adapter_that_does_not_fit_is_one_line_error(bert_two, tmp_path):
    _, _, ids, mask, d, _ = bert_two
    sess = lo.session(d / "model.onnx", providers="cpu")
    site = "encoder.layer.0.attention.self.query"
    bad = {f"{site}.lora_A.weight": np.zeros((16, 4), np.float32), f"{site}.lora_B.weight": np.zeros((4, 32), np.float32)}
    lo.write_onnx_adapter(bad, tmp_path / "bad_shape.onnx_adapter")
    lo.write_onnx_adapter({"h.0.attn.c_attn.lora_A.weight": np.zeros((32, 4), np.float32),
                           "h.0.attn.c_attn.lora_B.weight": np.zeros((4, 96), np.float32)}, tmp_path / "gpt2.onnx_adapter")
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not an adapter")
    for name, needle in (("bad_shape", "does not fit (32, "), ("gpt2", "unknown input 'h.0.attn.c_attn"),
                         ("junk", "not an ONNX Runtime .onnx_adapter")):
        with pytest.raises(ExportError) as e:
            sess({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, adapter=tmp_path / f"{name}.onnx_adapter")
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_non_lora_method_cannot_be_separate_and_leaves_no_file(tmp_path):
    from lowrank_compiler.methods.base import register_method
    from lowrank_compiler.methods.lora import LoRA

    @register_method
    class _TwiceLoRA(LoRA):  # own forward, declared without an x·A·B form; exact delta: merge still works
        name = "test_twice_lora"

        def low_rank_factors(self):
            return None

        def forward(self, x, weight, bias):
            return torch.nn.functional.linear(x, weight, bias) + 2 * self.lora_branch(x)

        def delta_weight(self, weight):
            return 2 * super().delta_weight(weight)

    gm, ids, mask = transformed("bert", spec="attention.self.query:test_twice_lora(r=2)")
    with pytest.raises(ExportError, match="--merge"):
        lrc.export(gm, tmp_path / "s.onnx")
    with pytest.raises(ExportError, match="PEFT format holds LoRA-form adapters .* and DoRA only"):
        lrc.export(gm, tmp_path / "peft", format="peft")
    assert list(tmp_path.iterdir()) == []
    report = lrc.export(gm, tmp_path / "m.onnx", merge=True)  # merged works for any method
    assert report["max_abs_diff"] <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_unknown_format_and_missing_inputs():
    gm, _, _ = transformed("bert")
    with pytest.raises(ExportError, match="unknown format 'tflite'; valid: onnx"):
        lrc.export(gm, "x.onnx", format="tflite")
    with pytest.raises(ExportError, match="suffix"):
        lrc.export(gm, "x.bin")
    plain = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    with pytest.raises(ExportError, match="example inputs"):
        lo.export_onnx(plain, "never.onnx")
