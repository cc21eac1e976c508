"""Quantized causal-LM decode graphs (`lrc.export(gm, path, quantize="int8"|"int4")`, issue 23): int8 passes its
gate on held-out prompts and its greedy tokens equal torch's ``generate`` for the unmodified base and with the
adapter active; the fp32 adapter still switches on the quantized graph (in lrc's ORT loop and in
onnxruntime-genai's ``og.Adapters`` on a quantized genai folder); a gate failure refuses and writes nothing."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers.decoder import SPECS, greedy_tokens, make_decoder

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.backends.onnx.generate import ort_generate
from lowrank_compiler.backends.onnx.quantize_decoder import (
    GATE_SEED,
    held_out_prompts,
    lm_head,
    quantize_decoder,
    quantize_decoder_model,
)
from lowrank_compiler.cli import main
from lowrank_compiler.errors import ExportError

NEW = 8
slow = pytest.mark.slow  # the `lm` fixture exports a decode graph (~20 s idle, minutes on a loaded 2-core host)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(LoRA model with non-zero B, untouched base, folder, fp32 decode graph report)."""
    model = make_decoder("llama")
    base = copy.deepcopy(model)
    gm = lrc.transform(model, SPECS["llama"][0])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in lrc.adapters(gm).values():
            mod.lora_B.normal_(0, 0.3, generator=g)
    d = tmp_path_factory.mktemp("qdec")
    report = lrc.export(gm, d / "fp32.onnx", adapter_name="task")
    return gm, base, d, report


def _torch_tokens(model, prompt: np.ndarray) -> np.ndarray:
    return greedy_tokens(model, prompt, NEW)


@slow
def test_int8_passes_gate_on_held_out_prompts_and_matches_torch(lm):
    gm, base, d, rep = lm
    adapter = rep["adapters"][0]
    q = quantize_decoder(d / "fp32.onnx", d / "int8.onnx", "int8", adapters=[adapter])
    assert q["passed"] and q["gate"]["prompts"] == 3
    assert q["gate"]["cosine"] >= q["min_cosine"] and q["gate"]["agreement"] >= q["min_agreement"]
    assert {r["adapter"] for r in q["gate"]["runs"]} == {None, "task"}
    assert q["kept_fp32"] and q["lora_fp32"] == 2 * 14  # the LM head and every LoRA MatMul stay fp32
    proto = onnx.load(str(d / "int8.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == q["quantized"] == 14 and "Gather" in ops
    # held out: not the export's example ids (seed 0), and torch's tokens come from other models than the gate's
    prompts = held_out_prompts(100, seed=GATE_SEED + 1)
    sess = session(d / "int8.onnx", providers="cpu")
    for p in prompts:
        want_base, want_ad = _torch_tokens(base, p), _torch_tokens(gm, p)
        got_base = ort_generate(sess, p, max_new_tokens=NEW)
        got_ad = ort_generate(sess, p, max_new_tokens=NEW, adapter=adapter)
        assert not np.array_equal(want_base, want_ad)  # the adapter changes the tokens ...
        np.testing.assert_array_equal(got_base, want_base)  # ... and the quantized graph follows both
        np.testing.assert_array_equal(got_ad, want_ad)


@slow
def test_gate_failure_refuses_and_writes_nothing_no_gate_writes(lm):
    _, _, d, rep = lm
    with pytest.raises(ExportError, match="held-out prompt.*nothing written"):
        quantize_decoder(d / "fp32.onnx", d / "strict.onnx", "int4", adapters=rep["adapters"], min_cosine=0.999999)
    assert not (d / "strict.onnx").exists()
    q = quantize_decoder(d / "fp32.onnx", d / "strict.onnx", "int4", gate=False, min_cosine=0.999999)
    assert q["gate"] is None and (d / "strict.onnx").is_file()


@slow
def test_cli_quantize_refusal_is_one_line_and_leaves_no_file(lm, tmp_path, capsys):
    """Through the CLI (a saved lrc file rebuilt with its HF face): exit 2, one error line, an empty folder;
    then int8 passes, prints the gate's line and writes the graph and the fp32 adapter."""
    gm, _, _, _ = lm
    lrc.save(gm, tmp_path / "lm.lrc")
    out = tmp_path / "out"
    out.mkdir()
    code = main(["export", str(tmp_path / "lm.lrc"), "--quantize", "int4", "--min-cosine", "0.999999",
                 "-o", str(out / "q.onnx")])
    err = capsys.readouterr().err.strip().splitlines()  # after the tracing notices: one error line
    assert code == 2 and err[-1].startswith("lrc export: error: int4 decoder is too inaccurate")
    assert sum(line.startswith("lrc export: error") for line in err) == 1 and not err[-1].startswith(" ")
    assert list(out.iterdir()) == []  # neither the graph nor the adapter file
    assert main(["export", str(tmp_path / "lm.lrc"), "--quantize", "int8", "-o", str(out / "q.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "int8 decoder: 14 MatMul(s) quantized, 28 LoRA-branch and 1 other (LM head) fp32" in printed
    assert "greedy agreement" in printed and "PASSED" in printed
    assert sorted(p.name for p in out.iterdir()) == ["lm.onnx_adapter", "q.onnx"]


@slow
def test_int4_genai_folder_loads_and_switches_adapters(lm, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    gm, _, _, _ = lm
    out = tmp_path / "genai4"
    rep = lrc.export(gm, out, format="genai", quantize="int4", adapter_name="task")
    assert rep["passed"] and rep["quantize"] == "int4"
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == rep["quantized"]
    sess = session(out / "model.onnx", providers="cpu")  # loads in plain ORT too
    model = og.Model(str(out))
    ads = og.Adapters(model)
    ads.load(str(out / "adapters" / "task.onnx_adapter"), "task")
    prompt = held_out_prompts(100, n=1, seed=GATE_SEED + 2)[0]

    def og_tokens(adapter: str | None) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + NEW, do_sample=False, batch_size=1)
        gen = og.Generator(model, params)
        if adapter:
            gen.set_active_adapter(ads, adapter)
        gen.append_tokens(prompt.astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return list(gen.get_sequence(0))

    with_ad, without = og_tokens("task"), og_tokens(None)
    assert with_ad != without
    assert with_ad == ort_generate(sess, prompt, max_new_tokens=NEW, adapter=out / "adapters" / "task.onnx_adapter")[0].tolist()
    assert without == ort_generate(sess, prompt, max_new_tokens=NEW)[0].tolist()



def _toy_decoder() -> onnx.ModelProto:
    """Gather (embedding) -> MatMul W1 -> LoRA (x·A·B, overridable A/B inputs) added -> MatMul head -> logits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"emb": rng.standard_normal((50, 64)), "w1": rng.standard_normal((64, 64)),
             "head": rng.standard_normal((64, 50)), "a": rng.standard_normal((64, 4)), "b": rng.standard_normal((4, 64))}
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="gather"),
             helper.make_node("MatMul", ["h", "w1"], ["y"], name="w1"),
             helper.make_node("MatMul", ["h", "a"], ["ha"], name="xa"),
             helper.make_node("MatMul", ["ha", "b"], ["hab"], name="xab"),
             helper.make_node("Add", ["y", "hab"], ["z"], name="add"),
             helper.make_node("MatMul", ["z", "head"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"]),
                       helper.make_tensor_value_info("a", TensorProto.FLOAT, [64, "r"]),
                       helper.make_tensor_value_info("b", TensorProto.FLOAT, ["r", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 50])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("mode,bits", [("int8", 8), ("int4", 4)])
def test_only_base_weights_are_quantized(mode, bits):
    model = _toy_decoder()
    head = lm_head(model)
    assert head == "head"
    q, rep = quantize_decoder_model(model, mode)
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert rep == {"quantized": 1, "lora_fp32": 2, "kept_fp32": [head]}
    assert len(nbits) == 1 and nbits[0].input[0] == "h"  # W1 only: not the LoRA pair, the head or the Gather
    assert {a.name: a.i for a in nbits[0].attribute}["bits"] == bits
    assert [n.op_type for n in q.graph.node].count("MatMul") == 3 and "Gather" in [n.op_type for n in q.graph.node]
    assert {i.name for i in q.graph.input} >= {"a", "b"}  # the adapter inputs stay overridable


def test_unknown_mode_is_refused():
    with pytest.raises(ExportError, match="unknown quantization 'int2'; valid: int8, int4"):
        quantize_decoder_model(_toy_decoder(), "int2")
