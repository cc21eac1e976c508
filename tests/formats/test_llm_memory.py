"""Issue 22: save/load memory is bounded by the model (4 layers of the TinyLlama-1.1B shape, fp32, in subprocesses).

Peaks are VmHWM after a reset minus the RSS just before the call, as multiples of the weights' bytes W (save) or
of the file's size F (load). Budgets: load ≤ 1.3 F; save ≤ 0.3 W plus two copies of the largest tensor
(torch.export.save copies each payload to bytes and holds the previous one while making the next: at this
reduced size the two 262 MB embedding matrices are 0.43 W, at 22 layers 0.12 W).
"""

from __future__ import annotations

import pytest

from tests.helpers.memory import run_phase

BUILD = '''
import lowrank_compiler as lrc, transformers as tf
cfg = tf.LlamaConfig(num_hidden_layers=4, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                     intermediate_size=5632, vocab_size=32000)
torch.manual_seed(0)
model = tf.LlamaForCausalLM(cfg).eval()
W = sum(p.numel() * p.element_size() for p in model.parameters())
BIG = max(p.numel() * p.element_size() for p in model.parameters())
ids = torch.randint(3, 32000, (1, 8))
gm = lrc.transform(model, "self_attn.q_proj:lora(r=16, alpha=32); self_attn.v_proj:lora(r=16, alpha=32)",
                   example_inputs=(ids,))
with torch.no_grad():
    for n, p in gm.named_parameters():
        if "lora_B" in n:
            p.normal_()  # a non-trivial adapter, so the reloaded model must carry it
    ref = gm(input_ids=ids).logits
'''


@pytest.mark.slow
def test_save_and_load_peaks_are_bounded_by_the_weights(tmp_path):
    path = tmp_path / "m.lrc"
    saved = run_phase(BUILD + f'''
_, s, peak = measure(lambda: lrc.save(gm, {str(path)!r}))
from safetensors.torch import save_file
save_file({{"ids": ids, "ref": ref.contiguous()}}, {str(tmp_path / "ref.safetensors")!r})
print(json.dumps({{"W": W, "big": BIG, "peak": peak}}))
''')
    W, big = saved["W"], saved["big"]
    assert saved["peak"] <= 0.3 * W + 2 * big, saved
    loaded = run_phase(f'''
import lowrank_compiler as lrc
F = os.path.getsize({str(path)!r})
gm, s, peak = measure(lambda: lrc.load({str(path)!r}))
from safetensors.torch import load_file
want = load_file({str(tmp_path / "ref.safetensors")!r})
out = gm(want["ids"])
got = out["logits"] if isinstance(out, dict) else out[0]
print(json.dumps({{"F": F, "peak": peak, "diff": float((got - want["ref"]).abs().max())}}))
''')
    assert loaded["peak"] <= 1.3 * loaded["F"], loaded
    assert W <= loaded["F"] <= 1.05 * W  # the file holds the weights once
    assert loaded["diff"] < 1e-4, loaded  # the reloaded model (base + trained-like adapters) is the saved one


@pytest.mark.slow
def test_decoder_onnx_export_with_external_data_peak_is_bounded(tmp_path):
    """Decode graph, LoRA pairs as ORT adapter inputs, weights written once to ``model.onnx.data``: ≤ 0.5 W
    (issue 22's target 2.5 W; +1.1 W while the separate pass copied the graph's weights)."""
    out = tmp_path / "onnx" / "model.onnx"
    rep = run_phase(BUILD + f'''
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx
rep, s, peak = measure(lambda: export_decoder_onnx(gm, {str(out)!r}, merge=False, external_data=True,
                                                   validate=False))
print(json.dumps({{"W": W, "peak": peak, "external": rep["external_data"]}}))
''')
    assert rep["external"] and rep["peak"] <= 0.5 * rep["W"], rep
    data = out.with_name("model.onnx.data").stat().st_size
    assert rep["W"] <= data <= 1.05 * rep["W"]  # every weight once (the LoRA pairs' traced values are r x d)
    import onnx

    proto = onnx.load(str(out), load_external_data=False)
    lora = [i.name for i in proto.graph.input if i.name.endswith(".lora_A.weight")]
    assert len(lora) == 8  # q and v of 4 layers are adapter inputs


@pytest.mark.slow
def test_pt2_and_safetensors_exports_stream(tmp_path):
    """``lrc.export`` to pt2 and to (merged) safetensors writes tensor by tensor: no whole-file bytes in memory.

    pt2: torch.export.save's own two payload copies as for ``lrc.save``; merged safetensors: the merged copy
    of the weights (1 W, ``lrc.merge``) plus at most one tensor; the adapters file: a few MB.
    """
    rep = run_phase(BUILD + f'''
from safetensors import safe_open
out = {{}}
for name, kw in (("m.pt2", {{}}), ("merged.safetensors", {{"merge": True}}), ("ad.safetensors", {{}})):
    p = os.path.join({str(tmp_path)!r}, name)
    _, s, peak = measure(lambda: lrc.export(gm, p, **kw))
    out[name] = {{"peak": peak, "size": os.path.getsize(p)}}
with safe_open(os.path.join({str(tmp_path)!r}, "merged.safetensors"), "pt") as f:
    w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    m = lrc.adapters(gm)["model.layers.0.self_attn.q_proj"]
    base = gm.get_parameter("model.layers.0.self_attn.q_proj.weight")
    out["merge_diff"] = float((w - base - m.scaling * m.lora_B @ m.lora_A).abs().max())
ep = torch.export.load(os.path.join({str(tmp_path)!r}, "m.pt2"))
got = ep.module()(ids)
got = got["logits"] if isinstance(got, dict) else got[0]
out["pt2_diff"] = float((got - ref).abs().max())
print(json.dumps({{"W": W, "big": BIG, **out}}))
''')
    W, big = rep["W"], rep["big"]
    assert rep["m.pt2"]["peak"] <= 0.3 * W + 2 * big and rep["m.pt2"]["size"] >= W, rep
    assert rep["merged.safetensors"]["peak"] <= 1.1 * W + big and rep["merged.safetensors"]["size"] >= W, rep
    assert rep["ad.safetensors"]["peak"] <= 0.01 * W, rep
    assert rep["merge_diff"] < 1e-4 and rep["pt2_diff"] < 1e-4, rep  # the files hold the model
