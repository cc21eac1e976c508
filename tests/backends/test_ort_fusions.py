"""ORT graph fusions (backends/onnx/fusions): each rule's rewrite count on a graph where it must fire,
and ONNX Runtime outputs of the fused model against the unfused model and against torch.

Tolerance: fused kernels only reorder fp32 sums. On these tiny models fused and unfused ORT agree to
~1e-7 and ORT agrees with torch to ~1e-6, while a wrong mask, bias or lost adapter path moves outputs
by > 1e-2, so TOL = 1e-4 (the export tests' tolerance) separates them by two decades either way.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers.decoder import SPECS, make_decoder
from helpers.export import base_out, randomize, shapes, torch_out, transformed

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx import export as lo
from lowrank_compiler.backends.onnx import fusions as oo
from lowrank_compiler.backends.onnx.adapters import lora_adapter_tensors, write_onnx_adapter
from lowrank_compiler.cli import main
from lowrank_compiler.errors import ExportError

TOL = 1e-4


def _feeds(ids, mask):
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _ops(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _sess(model):
    return lo.OrtSession(oo.verify.session(model.SerializeToString()))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Tiny stock BERT with LoRA on q/k/v: merged export via the CLI with --no-optimize, separate via the API."""
    d = tmp_path_factory.mktemp("ortfuse")
    gm, ids, mask = transformed("bert")
    lrc.save(gm, d / "task_a.pt")
    assert main(["export", "--merge", "--no-optimize", "--no-validate", str(d / "task_a.pt"), "-o", str(d / "m.onnx")]) == 0
    rep = lrc.export(gm, d / "s.onnx", adapters_dir=d, adapter_name="task_a", validate=False, optimize=False)
    assert "optimize" not in rep
    gm_b = copy.deepcopy(gm)
    randomize(gm_b, seed=7)
    write_onnx_adapter(lora_adapter_tensors(gm_b), d / "task_b.onnx_adapter")
    return gm, gm_b, d


def test_no_optimize_leaves_the_graph_unfused(bert):
    _, _, d = bert
    for name in ("m.onnx", "s.onnx"):
        ops = _ops(onnx.load(str(d / name)))
        assert ops["Softmax"] == 2 and "Attention" not in ops and "MultiHeadAttention" not in ops


def test_merged_bert_fuses_attention_norm_and_gelu(bert):
    gm, _, d = bert
    fused, rep = oo.optimize(onnx.load(str(d / "m.onnx")))
    f = rep["fusions"]
    # 2 layers: per layer one attention (sdpa -> MHA -> bias folded -> packed Attention), 2 skip-LN, 1 bias-GELU
    assert (f["sdpa"], f["mha2"], f["mha_bias"], f["attention"]) == (2, 2, 2, 2)
    assert (f["skip_layer_normalization"], f["bias_gelu"], f["lora_bias_hoist"]) == (4, 2, 0)
    assert rep["ops"] == {"Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
    assert rep["fallback"] is None and rep["max_abs_diff"] <= TOL
    ops = _ops(fused)
    assert "Softmax" not in ops and ops["LayerNormalization"] == 1  # only the embeddings' LayerNorm is left
    plain, fast = _sess(onnx.load(str(d / "m.onnx"))), _sess(fused)
    for ids, mask in shapes():  # other batch/seq sizes than the samples, with padding
        got = fast(_feeds(ids, mask))[0]
        assert np.abs(got - plain(_feeds(ids, mask))[0]).max() <= TOL
        assert np.abs(got - torch_out(gm, ids, mask)).max() <= TOL
    ids, mask = shapes()[0]
    mask[1] = 0  # a fully padded row: the unfused graph's Where(IsNaN) guard and the fused op must agree
    got = fast(_feeds(ids, mask))[0]
    assert np.isfinite(got).all() and np.abs(got - plain(_feeds(ids, mask))[0]).max() <= TOL


def test_separate_bert_keeps_swappable_adapters(bert):
    """LoRA graph: the bias hoist fires per site, attention fuses to MHA, and both adapters still switch."""
    gm, gm_b, d = bert
    model = onnx.load(str(d / "s.onnx"))
    fused, rep = oo.optimize(model)
    f = rep["fusions"]
    assert f["lora_bias_hoist"] == 6  # q, k, v in 2 layers
    assert (f["sdpa"], f["mha2"], f["mha_bias"], f["attention"]) == (2, 2, 2, 0)  # packed Attention cannot take LoRA
    assert rep["ops"] == {"MultiHeadAttention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
    assert oo.verify.overridable(fused) == oo.verify.overridable(model)  # same names, same symbolic dims
    sess = _sess(fused)
    for ids, mask in shapes():
        feeds = _feeds(ids, mask)
        ref_a, ref_b, ref_0 = torch_out(gm, ids, mask), torch_out(gm_b, ids, mask), base_out(gm, ids, mask)
        assert np.abs(ref_a - ref_b).max() > 1e-2 and np.abs(ref_a - ref_0).max() > 1e-2
        for adapter, ref in (("task_a", ref_a), ("task_b", ref_b), (None, ref_0), ("task_a", ref_a)):
            got = sess(feeds, adapter=None if adapter is None else d / f"{adapter}.onnx_adapter")[0]
            assert np.abs(got - ref).max() <= TOL, adapter


def test_stock_bias_rule_breaks_the_lora_graph_ours_does_not(bert):
    """Why mha_bias.py exists: onnxscript's stock pipeline takes each LoRA delta for a bias (the graph
    fails in ORT), and it drops the LoRA weights from the graph inputs (no adapter could bind)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, _, d = bert
    model = onnx.load(str(d / "s.onnx"))
    stock, counts = optimize_for_ort(ir.from_proto(model))
    stock = ir.to_proto(stock)
    assert counts["mha_bias"] == 2 and not oo.verify.overridable(stock)
    with pytest.raises(Exception, match="'bias' is expected to have 1 dimension, got 3"):
        oo.verify.session(stock.SerializeToString()).run(None, oo.verify.sample_feeds(model))
    irm = ir.from_proto(model)
    ours = oo.fusions.run_fusions(irm, groups=("attention",))
    assert (ours["lora_bias_hoist"], ours["mha_bias"]) == (6, 2)
    fused = ir.to_proto(irm)
    feeds = {**oo.verify.sample_feeds(model), **oo.verify.probe_adapter(model)}
    want = oo.verify.session(model.SerializeToString()).run(None, feeds)[0]
    assert np.abs(oo.verify.session(fused.SerializeToString()).run(None, feeds)[0] - want).max() <= TOL


def test_checked_mha_rule_fuses_gpt2_decoder(tmp_path):
    """GPT-2 flattens the attention output for its Conv1D: the stock MHA rule breaks the graph there, ours
    adds the reshape; the fused decode graph (past key/values) still matches torch in export's validation."""
    gm = lrc.transform(make_decoder("gpt2"), SPECS["gpt2"][0])
    rep = lrc.export(gm, tmp_path / "d.onnx", adapters_dir=tmp_path, optimize=True)
    fr = rep["optimize"]
    assert fr["fusions"]["mha1"] == 2 and fr["ops"]["MultiHeadAttention"] == 2, fr
    assert fr["fallback"] is None and fr["fusions"]["skip_layer_normalization"] == 5
    assert rep["max_abs_diff"] <= TOL  # ORT (fused, model's adapter active) vs the torch decode call
    plain = lrc.export(gm, tmp_path / "p.onnx", merge=True, validate=False)
    assert "optimize" not in plain  # decoders are not fused by default
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    stock, counts = optimize_for_ort(ir.load(str(tmp_path / "p.onnx")))
    assert counts["mha1"] == 2
    with pytest.raises(Exception, match="Gemm"):
        oo.verify.session(ir.to_proto(stock).SerializeToString())


def test_llama_rms_norms_fuse_and_the_lone_one_is_unfused(tmp_path):
    """Llama (default export): 4 of 5 RMSNorms fuse with their residual add; the first layer's input norm has
    none and goes back to primitives (rms_lone.py), so the file stays onnx.checker-clean; matches torch."""
    gm, ids, mask = transformed("llama")
    rep = lrc.export(gm, tmp_path / "l.onnx", merge=True)
    fr = rep["optimize"]
    f = fr["fusions"]
    assert (f["rms_normalization"], f["skip_rms_normalization"], f["lone_rms_unfused"]) == (5, 4, 1)
    assert fr["ops"] == {"MultiHeadAttention": 2, "SkipSimplifiedLayerNormalization": 4} and fr["fallback"] is None
    assert rep["max_abs_diff"] <= TOL  # export's own ORT (fused) vs torch check
    model = onnx.load(str(tmp_path / "l.onnx"))
    onnx.checker.check_model(model, full_check=True)
    sess = _sess(model)
    for ids2, mask2 in shapes():
        assert np.abs(sess(_feeds(ids2, mask2))[0] - torch_out(gm, ids2, mask2)).max() <= TOL


def test_drift_falls_back_and_strict_refuses(bert, monkeypatch):
    """A fusion that changes the numbers (here GELU -> ReLU) is dropped with its group; strict raises."""
    from onnxscript.rewriter import _fusion_utils, pattern

    class GeluToRelu(pattern.RewriteRuleClassBase):
        def pattern(self, op, x):
            return op.Gelu(x)

        def rewrite(self, op, x):
            return op.Relu(x)

    bad = _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([GeluToRelu.rule()]))
    monkeypatch.setitem(oo.fusions.STAGES, "erf_gelu", (bad, "elementwise"))
    gm, _, d = bert
    model = onnx.load(str(d / "m.onnx"))
    fused, rep = oo.optimize(model)
    assert "elementwise" not in rep["groups"] and "outputs moved by" in rep["fallback"]
    assert rep["ops"] == {"Attention": 2, "SkipLayerNormalization": 4}
    ids, mask = shapes()[0]
    assert np.abs(_sess(fused)(_feeds(ids, mask))[0] - torch_out(gm, ids, mask)).max() <= TOL
    with pytest.raises(ExportError, match="ORT fusions refused: .*outputs moved by"):
        oo.optimize(model, strict=True)


def test_export_default_fuses_encoders_and_cli_reports_it(bert, capsys):
    _, _, d = bert
    assert main(["export", "--merge", str(d / "task_a.pt"), "-o", str(d / "auto.onnx")]) == 0
    out = capsys.readouterr().out
    assert "ORT fusions: 2 Attention, 4 SkipLayerNormalization, 2 BiasGelu" in out
    diff = float(out.split("max |ORT - torch| = ")[1].split()[0])  # export's own check, on the fused file
    assert diff <= TOL
    assert _ops(onnx.load(str(d / "auto.onnx")))["Attention"] == 2


def test_bad_arguments_are_clear_errors(bert, tmp_path):
    gm, _, d = bert
    with pytest.raises(ExportError, match="unknown fusion groups \\['nope'\\]; valid: norm"):
        oo.optimize(onnx.load(str(d / "m.onnx")), groups=("nope",))
    with pytest.raises(ExportError, match="optimize=True needs ONNX output"):
        lrc.export(gm, tmp_path / "x.pt2", optimize=True)
    with pytest.raises(ExportError, match="cannot run the unfused model on the sample inputs"):
        oo.optimize(onnx.load(str(d / "m.onnx")), feeds={"input_ids": np.zeros((2, 3), np.int64)})


@pytest.mark.slow
def test_minilm_separate_export_fuses_and_switches(minilm, minilm_batch, tmp_path):
    model, _ = minilm
    ids, mask = minilm_batch
    gm = lrc.transform(model, "attention.self.query:lora(r=8, alpha=16); attention.self.value:lora(r=8, alpha=16)",
                       (ids,), {"attention_mask": mask})
    randomize(gm, seed=3, std=0.05)
    rep = lrc.export(gm, tmp_path / "s.onnx", adapters_dir=tmp_path)  # default: fused, validated vs torch
    fr = rep["optimize"]
    assert fr["ops"] == {"MultiHeadAttention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}
    assert fr["fusions"]["lora_bias_hoist"] == 12 and rep["max_abs_diff"] <= TOL
    sess = lo.session(tmp_path / "s.onnx", "cpu")
    ids2, mask2 = ids.repeat(2, 2)[:5, :24], mask.repeat(2, 2)[:5, :24]
    assert np.abs(sess(_feeds(ids2, mask2), adapter=tmp_path / "s.onnx_adapter")[0] - torch_out(gm, ids2, mask2)).max() <= TOL
    assert np.abs(sess(_feeds(ids2, mask2))[0] - base_out(gm, ids2, mask2)).max() <= TOL
    with torch.no_grad():
        assert np.abs(torch_out(gm, ids2, mask2) - base_out(gm, ids2, mask2)).max() > 1e-2
