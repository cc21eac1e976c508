"""Quantized ONNX export with an accuracy gate; quantized base + fp32 swappable adapters (QLoRA-style serving).

References are the torch graphs (merged copy, or the transformed graph with its adapters), computed
here; the cosine is recomputed in the test, not read from the report.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers.common import example_ids, make_hf

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx import export as lo
from lowrank_compiler.backends.onnx.quantize import output_error, weight_matmuls
from lowrank_compiler.backends.onnx.smoothquant import OUTLIER_PREFIX, smooth
from lowrank_compiler.cli import main
from lowrank_compiler.errors import ExportError

QUANT_OPS = {"int8": {"DynamicQuantizeMatMul", "MatMulInteger"}, "int4": {"MatMulNBits"}}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def bert():
    model = make_hf("bert")
    ids = example_ids(4, 16)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    gm = lrc.transform(model, "attention.self.*:lora(r=4, alpha=8)", example_inputs=(ids,),
                       example_kwargs={"attention_mask": mask}, progress=False)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.3)
    return gm.eval(), ids, mask


def _torch_out(gm, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return gm(ids, attention_mask=mask).last_hidden_state.numpy()


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_merged_quantized_export_is_gated_and_measured(bert, tmp_path, mode):
    gm, ids, mask = bert
    rep = lrc.export(gm, tmp_path / "m.onnx", merge=True, quantize=mode)
    assert rep["passed"] and rep["cosine"] >= 0.999 and rep["quantized"] > 0
    assert _ops(tmp_path / "m.onnx") & QUANT_OPS[mode]
    ref = _torch_out(lrc.merge(gm), ids, mask)
    got = lo.session(tmp_path / "m.onnx", providers="cpu")({"input_ids": ids, "attention_mask": mask})[0]
    assert _cos(got, ref) >= 0.999 - 1e-4  # the gate's claim, checked against torch (not ORT fp32)
    assert np.abs(got - ref).max() <= rep["max_abs_err"] + 1e-3


def test_gate_refuses_and_force_writes(bert, tmp_path):
    gm, _, _ = bert
    strict = 1 - 1e-12  # no 4-bit MatMul, not even one alone, is that close to fp32
    with pytest.raises(ExportError, match=r"int4 quantization is too inaccurate: output cosine 0\.\d+ < 0\.9999"
                                          r".*\(max abs error .* no subset of the MatMuls passes"):
        lrc.export(gm, tmp_path / "m.onnx", merge=True, quantize="int4", min_cosine=strict)
    assert not list(tmp_path.iterdir())  # nothing left behind
    rep = lrc.export(gm, tmp_path / "m.onnx", merge=True, quantize="int4", min_cosine=strict, force=True)
    assert rep["forced"] and not rep["passed"] and (tmp_path / "m.onnx").is_file()
    with pytest.raises(ExportError, match="unknown quantization 'int3'; valid: int8, int4"):
        lrc.export(gm, tmp_path / "x.onnx", merge=True, quantize="int3")
    with pytest.raises(ExportError, match="needs ONNX output"):
        lrc.export(gm, tmp_path / "x.pt2", merge=True, quantize="int8")


def test_output_error_matches_formula():
    r = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.0])]
    g = [np.array([[1.0, 2.5], [3.0, 3.0]]), np.array([0.0])]
    max_abs, cos = output_error(r, g)
    assert max_abs == 1.0
    assert cos == pytest.approx((1 + 5 + 9 + 12) / np.sqrt(30) / np.sqrt(1 + 6.25 + 9 + 9))


def test_quantized_base_keeps_fp32_swappable_adapters(bert, tmp_path):
    """QLoRA-style serving: int8 base MatMuls, LoRA MatMuls fp32 and overridable, adapters switch per run."""
    gm, ids, mask = bert
    other = copy.deepcopy(gm)
    with torch.no_grad():
        for a in lrc.adapters(other).values():
            a.lora_B.normal_(std=0.3)
    lrc.save_adapters(other, tmp_path / "other.safetensors")
    rep = lrc.export(gm, tmp_path / "q.onnx", quantize="int8", adapters_dir=tmp_path / "ad", adapter_name="mine",
                     extra_adapters=[str(tmp_path / "other.safetensors")])
    assert rep["passed"] and rep["lora_fp32"] == 2 * len(lrc.adapters(gm))
    model = onnx.load(str(tmp_path / "q.onnx"))
    base, lora = weight_matmuls(model)
    assert len(lora) == rep["lora_fp32"] and {n.op_type for n in model.graph.node if n.name in lora} == {"MatMul"}
    sess = lo.session(tmp_path / "q.onnx", providers="cpu")
    assert len(sess.lora_inputs()) == 2 * len(lrc.adapters(gm))  # still overridable inputs
    feeds = {"input_ids": ids, "attention_mask": mask}
    from lowrank_compiler.passes.pipelines import base_pipeline

    refs = {None: _torch_out(base_pipeline()(copy.deepcopy(gm)).gm, ids, mask),
            tmp_path / "ad" / "mine.onnx_adapter": _torch_out(gm, ids, mask),
            tmp_path / "ad" / "other.onnx_adapter": _torch_out(other, ids, mask)}
    outs = {k: sess(feeds, adapter=k)[0] for k in refs}
    for k, ref in refs.items():
        assert _cos(outs[k], ref) >= 0.999 - 1e-4, k
    # the adapters really switch: each output is nearest to its own reference
    for k in refs:
        errs = {j: np.abs(outs[k] - refs[j]).max() for j in refs}
        assert min(errs, key=errs.get) == k


def test_cli_prints_error_and_refuses(bert, tmp_path, capsys):
    gm, _, _ = bert
    lrc.save(gm, tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), "-o", str(tmp_path / "m.onnx"), "--merge",
                 "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "int8 vs fp32 on the sample inputs: max abs error" in out and "PASSED" in out
    assert main(["export", str(tmp_path / "model.pt"), "-o", str(tmp_path / "n.onnx"), "--merge",
                 "--quantize", "int4", "--min-cosine", str(1 - 1e-12)]) == 2
    assert "too inaccurate" in capsys.readouterr().err and not (tmp_path / "n.onnx").exists()


def test_smoothing_and_outlier_split_are_exact_on_a_bert_export(bert, tmp_path):
    """Every MatMul group of a dynamo-exported BERT smoothed, with 4 outlier channels each taken out to fp32:
    the attention-out input folds into V's columns ("producer"), the rest get a Mul; outputs unchanged."""
    gm, ids, mask = bert
    lrc.export(gm, tmp_path / "m.onnx", merge=True, optimize=False)  # as the quantizer exports
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = lo.session(tmp_path / "m.onnx", providers="cpu")(feeds)
    m = onnx.load(str(tmp_path / "m.onnx"))
    base, _ = weight_matmuls(m)
    samples = [{k: v.numpy() for k, v in feeds.items()}]
    plain = smooth(m, base, samples, alpha=0.5, outliers=0)
    assert {v["how"] for v in plain.values()} == {"producer", "mul"}
    onnx.save(m, str(tmp_path / "s.onnx"))
    assert output_error(ref, lo.session(tmp_path / "s.onnx", providers="cpu")(feeds))[0] < 1e-4

    m = onnx.load(str(tmp_path / "m.onnx"))
    split = smooth(m, base, samples, alpha=0.5, outliers=1e-9)  # any split is "good enough": always 4 channels
    assert all(len(v["outliers"]) == 4 for v in split.values())
    extra = [n for n in m.graph.node if n.name.startswith(OUTLIER_PREFIX)]
    assert len(extra) == len(base)
    onnx.save(m, str(tmp_path / "o.onnx"))
    assert output_error(ref, lo.session(tmp_path / "o.onnx", providers="cpu")(feeds))[0] < 1e-4


@pytest.mark.slow
def test_minilm_int8_gate_and_adapters(minilm, minilm_batch, tmp_path):
    """Real MiniLM (BERT outlier channels): one export with a separate adapter serves both claims -- the
    int8 base with the adapter on is the merged model's function within the gate, and the adapter switches."""
    model, _ = minilm
    ids, mask = minilm_batch
    torch.manual_seed(0)
    gm = lrc.transform(model, "attention.self.*:lora(r=8, alpha=16); attention.output.dense:lora(r=8, alpha=16)",
                       example_inputs=(ids,), example_kwargs={"attention_mask": mask}, progress=False)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.05)
    rep = lrc.export(gm, tmp_path / "q.onnx", quantize="int8", adapters_dir=tmp_path, adapter_name="a")
    assert rep["passed"] and rep["cosine"] >= 0.999 and rep["quantized"] > 0
    assert rep["smoothed"] > 0 and rep["outlier_channels"] > 0  # BERT's outlier channels were found
    assert _ops(tmp_path / "q.onnx") & QUANT_OPS["int8"]
    sess = lo.session(tmp_path / "q.onnx", providers="cpu")
    with_a = sess({"input_ids": ids, "attention_mask": mask}, adapter=tmp_path / "a.onnx_adapter")[0]
    without = sess({"input_ids": ids, "attention_mask": mask})[0]
    ref = _torch_out(gm.eval(), ids, mask)
    merged_ref = _torch_out(lrc.merge(gm).eval(), ids, mask)
    assert _cos(with_a, ref) >= 0.999 - 1e-4 and _cos(with_a, merged_ref) >= 0.999 - 1e-4
    assert np.abs(with_a - ref).mean() < np.abs(without - ref).mean() / 2  # the fp32 adapter switched on
