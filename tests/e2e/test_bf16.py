"""Issue 22: bf16 end to end at tiny size (a stock LlamaConfig): fp32 master adapters trained against PEFT, greedy
generate, an exact save/load round trip, and the ONNX decoder export, which writes fp32 (ORT's CPU provider has no
bf16 kernels) and is checked against the HF model upcast to fp32 with PEFT's adapter."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank_compiler as lrc
from tests.helpers.decoder import batch, fill_lora, make_decoder

pytestmark = pytest.mark.slow  # traces and two ONNX exports: 53 s at load 1.5, 293 s at load 11 (2 cores)

SPEC = "self_attn.q_proj:lora(r=4, alpha=8); self_attn.v_proj:lora(r=4, alpha=8)"


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lrc-transformed bf16 llama, PEFT model on an identical bf16 copy) with the same adapter tensors."""
    import peft

    model = make_decoder("llama").to(torch.bfloat16)
    twin = copy.deepcopy(model)
    gm = lrc.transform(model, SPEC, example_inputs=(batch(2, 8)["input_ids"],))
    pm = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fill_lora(gm, pm)
    return gm, pm


def test_lora_on_bf16_keeps_fp32_masters_and_trains_like_peft():
    gm, pm = _pair()
    ads = [p for n, p in gm.named_parameters() if "lora_" in n]
    assert ads and all(p.dtype == torch.float32 for p in ads)  # fp32 masters, as PEFT's autocast_adapter_dtype
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "lora_" in n)
    b = batch(4, 12)
    losses = {}
    for name, m in (("lrc", gm), ("peft", pm)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = m(**b, labels=b["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))
        m.eval()
    assert losses["lrc"][-1] < losses["lrc"][0]
    torch.testing.assert_close(losses["lrc"], losses["peft"], rtol=0, atol=2e-3)
    theirs = dict(pm.named_parameters())
    for site, mod in lrc.adapters(gm).items():  # the same AdamW on the same fp32 masters
        torch.testing.assert_close(mod.lora_A, theirs[f"base_model.model.{site}.lora_A.default.weight"],
                                   rtol=0, atol=2e-3)
    b = batch(2, 8)
    ours = gm.generate(**b, max_new_tokens=6, do_sample=False)
    ref = pm.generate(**b, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref)  # greedy tokens: the same HF modules, the same one-rounding adapter sum


def test_bf16_save_load_is_exact(tmp_path):
    gm, _ = _pair()
    ids = batch(2, 8)["input_ids"]
    with torch.no_grad():
        want = gm(input_ids=ids).logits
    lrc.save(gm, tmp_path / "m.lrc")
    back = lrc.load(tmp_path / "m.lrc")
    dtypes = {n: p.dtype for n, p in back.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    with torch.no_grad():
        out = back(ids)
    got = out["logits"] if isinstance(out, dict) else out[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_bf16_decoder_onnx_export_is_fp32_and_runs_on_cpu(tmp_path, capfd):
    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.generate import ort_generate

    gm, pm = _pair()
    rep = lrc.export(gm, tmp_path / "lm.onnx")  # decode graph, LoRA as adapter inputs, validated in ORT (CPU)
    assert "as float32 ONNX" in capfd.readouterr().err
    assert rep["dtype"] == "float32" and rep["source_dtype"] == "bfloat16" and rep["max_abs_diff"] < 1e-4, rep
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16  # untouched
    ref = copy.deepcopy(pm).float().eval()  # independent: HF + PEFT, upcast (bf16 -> fp32 is exact)
    b = batch(2, 8)
    sess = session(rep["path"], providers="cpu")
    got = ort_generate(sess, b["input_ids"], b["attention_mask"], max_new_tokens=6, adapter=rep["adapters"][0])
    want = ref.generate(**b, max_new_tokens=6, do_sample=False)
    assert torch.equal(torch.from_numpy(got), want)
    merged = lrc.export(gm, tmp_path / "merged.onnx", merge=True)
    assert merged["dtype"] == "float32" and merged["max_abs_diff"] < 1e-4, merged
