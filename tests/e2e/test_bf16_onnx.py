"""Issue 22: bf16 models export as float32 ONNX without an fp32 copy of their weights (backends/onnx/upcast.py).

The decoder file must compute what the fp32 twin's did (the export before: the model upcast and traced again):
equal tokens and logits. An encoder's file runs on ORT's CPU provider and matches HF + PEFT upcast to fp32.
Sizes keep weights above onnxscript's constant-folding limit (8192 elements), so the lazy upcast, the dropped
Cast and the lazily folded Transpose are what run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lowrank_compiler as lrc
from tests.helpers.decoder import fill_lora

SPEC_LM = "self_attn.q_proj:lora(r=4, alpha=8); self_attn.v_proj:lora(r=4, alpha=8)"


def _first_logits(sess, ids, mask, adapter):
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             "position_ids": np.clip(np.cumsum(mask.numpy(), -1) - 1, 0, None)}
    for i in sess.get_inputs():
        if i.name.startswith("past."):
            feeds[i.name] = np.zeros((ids.shape[0], int(i.shape[1]), 0, int(i.shape[3])), np.float32)
    return sess(feeds, adapter=adapter)[0]


@pytest.mark.slow  # four decoder exports: 40 s at load 3 (2 cores)
def test_bf16_decoder_export_equals_the_fp32_twin_export(tmp_path, capfd):
    import transformers as tf

    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.generate import export_decoder_onnx, ort_generate
    from tests.helpers.decoder import batch
    from tests.helpers.twin import fp32_twin

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                         intermediate_size=256, vocab_size=100, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    gm = lrc.transform(model, SPEC_LM, example_inputs=(batch(2, 8)["input_ids"],))
    fill_lora(gm)
    b = batch(2, 8)
    for merge in (False, True):
        new = export_decoder_onnx(gm, tmp_path / f"new{merge}.onnx", merge=merge, external_data=True)
        assert "as float32 ONNX" in capfd.readouterr().err
        old = export_decoder_onnx(fp32_twin(gm), tmp_path / f"old{merge}.onnx", merge=merge, external_data=True)
        assert new["source_dtype"] == "bfloat16" and new["max_abs_diff"] < 1e-4, new
        got = []
        for rep in (new, old):
            sess = session(rep["path"], providers="cpu")
            ad = rep["adapters"][0] if rep["adapters"] else None
            got.append((ort_generate(sess, b["input_ids"], b["attention_mask"], max_new_tokens=8, adapter=ad),
                        _first_logits(sess, b["input_ids"], b["attention_mask"], ad)))
        assert np.array_equal(got[0][0], got[1][0]), merge
        np.testing.assert_allclose(got[0][1], got[1][1], rtol=0, atol=1e-6)
        new_data = (tmp_path / f"new{merge}.onnx.data").stat().st_size
        assert new_data == (tmp_path / f"old{merge}.onnx.data").stat().st_size  # the same fp32 weights, once


def test_bf16_encoder_export_runs_on_cpu_and_matches_the_fp32_upcast(tmp_path, capfd):
    import peft
    import transformers as tf

    from lowrank_compiler.backends.onnx.export import export_onnx, session

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=256,
                        vocab_size=100, max_position_embeddings=64)
    model = tf.BertModel(cfg).eval().to(torch.bfloat16)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    gm = lrc.transform(model, "attention.self.query:lora(r=4, alpha=8); intermediate.dense:lora(r=4, alpha=8)",
                       example_inputs=(ids,))
    pm = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "intermediate.dense"]))
    fill_lora(gm, pm)
    ref = copy.deepcopy(pm).float().eval()  # independent: HF + PEFT upcast (bf16 -> fp32 is exact)
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state.numpy()
    sep = export_onnx(gm, tmp_path / "sep.onnx", merge=False, adapters_dir=tmp_path)
    assert "as float32 ONNX" in capfd.readouterr().err
    assert (sep["dtype"], sep["source_dtype"]) == ("float32", "bfloat16") and sep["max_abs_diff"] < 1e-4, sep
    got = session(sep["path"], providers="cpu")({"input_ids": ids}, adapter=sep["adapters"][0])[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    merged = export_onnx(gm, tmp_path / "merged.onnx", merge=True)
    got = session(merged["path"], providers="cpu")({"input_ids": ids})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert gm.get_parameter("encoder.layer.0.attention.self.query.weight").dtype == torch.bfloat16  # untouched


def test_float32_initializers_on_a_hand_built_bf16_graph(tmp_path):
    """Lazy upcast, dropped Casts, a folded Transpose (one use) and a kept one (a tied weight, two uses); the
    file written by onnx_ir runs in ORT and equals numpy over the weights upcast."""
    import ml_dtypes
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.upcast import float32_initializers

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(ml_dtypes.bfloat16)  # 8192 < size: what onnxscript leaves unfolded
    t = rng.standard_normal((128, 128)).astype(ml_dtypes.bfloat16)
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["W"], ["w32"], to=f32), helper.make_node("Transpose", ["w32"], ["wt"]),
             helper.make_node("Cast", ["x"], ["xb"], to=bf16), helper.make_node("Cast", ["xb"], ["x2"], to=f32),
             helper.make_node("MatMul", ["x2", "wt"], ["y"]),
             helper.make_node("Cast", ["T"], ["t32"], to=f32), helper.make_node("Transpose", ["t32"], ["tt"]),
             helper.make_node("Cast", ["T"], ["t32b"], to=f32), helper.make_node("MatMul", ["x", "tt"], ["z1"]),
             helper.make_node("MatMul", ["x", "t32b"], ["z2"]), helper.make_node("Add", ["z1", "z2"], ["z"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(t, "T")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, [2, 128])],
                              [helper.make_tensor_value_info("y", f32, [2, 64]),
                               helper.make_tensor_value_info("z", f32, [2, 128])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    counts = float32_initializers(model)
    assert counts == {"initializers": 2, "casts_dropped": 3, "transposes_folded": 1}, counts
    path = tmp_path / "m.onnx"
    ir.save(model, str(path), external_data="m.onnx.data", size_threshold_bytes=1024)
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    assert {i.data_type for i in proto.graph.initializer} == {f32}
    assert [n.op_type for n in proto.graph.node].count("Transpose") == 1  # the tied weight's
    assert (tmp_path / "m.onnx.data").stat().st_size == 4 * (w.size + t.size)  # each weight once, fp32
    x = rng.standard_normal((2, 128)).astype(np.float32)
    y, z = session(path, providers="cpu")({"x": x})
    w32, t32 = w.astype(np.float32), t.astype(np.float32)
    np.testing.assert_allclose(y, x @ w32.T, rtol=1e-5, atol=1e-4)  # Cast(x, bf16) became fp32: x unrounded
    np.testing.assert_allclose(z, x @ t32.T + x @ t32, rtol=1e-5, atol=1e-4)
