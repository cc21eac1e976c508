"""DoRA-FA (DoRA trained the LoRA-FA way) against PEFT's DoRA forward and LoRA-FA's projection formula.

Reference: PEFT's DoRA layers (``use_dora=True``) with the same tensors give the forward and the raw
gradients; the step is computed here by hand: ĝ_B = g_B (A Aᵀ + 1e-8 I)⁺ / s², torch AdamW on B and m,
A untouched. PEFT's own LoRA-FA optimizer crashes on DoRA (asserted, so the claim stays true).
"""

from __future__ import annotations

import pytest
import torch
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc

peft = pytest.importorskip("peft")
SITES = ("fc1", "fc2", "fc3")
S = 8 / 4


def _pair():
    pm = peft.get_peft_model(make_mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SITES),
                                                         use_dora=True))
    gm = lrc.transform(make_mlp(), "fc*:dora_fa(r=4, alpha=8, dropout=0.0)", example_inputs=(inputs(),))
    torch.manual_seed(5)
    with torch.no_grad():
        for site in SITES:
            lay, ad = getattr(pm.base_model.model, site), lrc.adapters(gm)[site]
            lay.lora_B.default.weight.normal_(0, 0.1)
            lay.lora_magnitude_vector.default.weight.mul_(1.05)
            ad.lora_A.copy_(lay.lora_A.default.weight)
            ad.lora_B.copy_(lay.lora_B.default.weight)
            ad.lora_magnitude_vector.copy_(lay.lora_magnitude_vector.default.weight)
    return pm, gm


def _batch(i):
    g = torch.Generator().manual_seed(40 + i)
    return torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)


def test_steps_match_peft_dora_with_the_lorafa_projection():
    pm, gm = _pair()
    layers = {s: getattr(pm.base_model.model, s) for s in SITES}
    As = {s: layers[s].lora_A.default.weight for s in SITES}
    Bs = [layers[s].lora_B.default.weight for s in SITES]
    ms = [layers[s].lora_magnitude_vector.default.weight for s in SITES]
    for a in As.values():
        a.requires_grad_(False)
    ref = torch.optim.AdamW(Bs + ms, lr=1e-2)
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    a0 = {s: As[s].clone() for s in SITES}
    for i in range(3):
        x, t = _batch(i)
        torch.testing.assert_close(gm(x), pm(x), atol=1e-5, rtol=0)
        (pm(x) - t).pow(2).mean().backward()
        with torch.no_grad():
            for s, B in zip(SITES, Bs):
                A = As[s]
                B.grad.copy_(B.grad @ torch.linalg.pinv(A @ A.T + 1e-8 * torch.eye(4)) / S**2)
        ref.step()
        ref.zero_grad()
        (gm(x) - t).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for s, B, m in zip(SITES, Bs, ms):
        ad = lrc.adapters(gm)[s]
        torch.testing.assert_close(ad.lora_B, B, atol=1e-5, rtol=0)
        torch.testing.assert_close(ad.lora_magnitude_vector, m, atol=1e-5, rtol=0)
        torch.testing.assert_close(ad.lora_A, a0[s], atol=0, rtol=0)  # frozen
        assert not ad.lora_A.requires_grad
    x, _ = _batch(9)
    torch.testing.assert_close(lrc.merge(gm)(x), gm(x), atol=1e-5, rtol=0)


def test_starts_at_the_base_and_peft_lorafa_crashes_on_dora():
    model = make_mlp()
    gm = lrc.transform(make_mlp(), "fc*:dora_fa(r=4, alpha=8)", example_inputs=(inputs(),))
    torch.testing.assert_close(gm.eval()(inputs()), model(inputs()), atol=1e-6, rtol=0)
    from peft.optimizers import create_lorafa_optimizer

    pm, _ = _pair()
    opt = create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-2)
    pm(inputs()).pow(2).mean().backward()
    with pytest.raises(TypeError):
        opt.step()
