"""LoRA+, LoRA-FA, DoRA and VeRA against PEFT (the independent reference), same tensors on both sides."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc

peft = pytest.importorskip("peft")
SITES = ("fc1", "fc2", "fc3")


def peft_model(config):
    return peft.get_peft_model(make_mlp(), config)


def layer(pm, site):
    return getattr(pm.base_model.model, site)


def data(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)


def copy_lora(pm, gm, nonzero_b: bool = True):
    """Give PEFT's B random values, then copy PEFT's A, B (and DoRA m) into ours."""
    torch.manual_seed(5)
    with torch.no_grad():
        for site in SITES:
            lay, ours = layer(pm, site), lrc.adapters(gm)[site]
            if nonzero_b:
                lay.lora_B.default.weight.normal_(0, 0.1)
            ours.lora_A.copy_(lay.lora_A.default.weight)
            ours.lora_B.copy_(lay.lora_B.default.weight)
            if hasattr(ours, "lora_magnitude_vector"):
                mag = lay.lora_magnitude_vector.default.weight
                mag.mul_(1 + 0.1 * torch.rand_like(mag))
                ours.lora_magnitude_vector.copy_(mag)


def train_steps(model, opt, steps, seed=3):
    for i in range(steps):
        x, t = data(seed + i)
        (model(x) - t).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_lora_plus_groups_and_step_match_peft():
    from peft.optimizers import create_loraplus_optimizer

    pm = peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SITES)))
    gm = lrc.transform(make_mlp(), "fc*:lora_plus(r=4, alpha=8, ratio=4)", example_inputs=(inputs(),))
    copy_lora(pm, gm)
    ref = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0)
    ours = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    ref_lr = {id(p): g["lr"] for g in ref.param_groups for p in g["params"]}
    our_lr = {id(p): g["lr"] for g in ours.param_groups for p in g["params"]}
    for site in SITES:
        lay, ad = layer(pm, site), lrc.adapters(gm)[site]
        assert our_lr[id(ad.lora_A)] == ref_lr[id(lay.lora_A.default.weight)] == 1e-2
        assert our_lr[id(ad.lora_B)] == ref_lr[id(lay.lora_B.default.weight)] == pytest.approx(4e-2)
    train_steps(pm, ref, 3)
    train_steps(gm, ours, 3)
    for site in SITES:
        torch.testing.assert_close(lrc.adapters(gm)[site].lora_B, layer(pm, site).lora_B.default.weight,
                                   rtol=0, atol=1e-6)


def test_lora_fa_step_matches_peft(monkeypatch):
    import peft.optimizers.lorafa as lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)  # PEFT would project in bf16 autocast
    pm = peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SITES)))
    gm = lrc.transform(make_mlp(), "fc*:lora_fa(r=4, alpha=8)", example_inputs=(inputs(),))
    copy_lora(pm, gm)
    ref = lorafa.create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-2)
    for g in ref.param_groups:
        g["eps"] = 1e-12  # PEFT adds eps before bias correction, torch after: make it irrelevant
    ours = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2, eps=1e-12, weight_decay=0.0)
    a0 = {s: lrc.adapters(gm)[s].lora_A.clone() for s in SITES}
    assert all(not a.lora_A.requires_grad for a in lrc.adapters(gm).values())
    train_steps(pm, ref, 3)
    train_steps(gm, ours, 3)
    for site in SITES:
        ad = lrc.adapters(gm)[site]
        assert torch.equal(ad.lora_A, a0[site])
        torch.testing.assert_close(ad.lora_B, layer(pm, site).lora_B.default.weight, rtol=0, atol=1e-5)


def test_lora_fa_projection_formula():
    """One SGD step with lr=1: ΔB = −(1/s²)·g_B·(AAᵀ)⁻¹, g_B the plain LoRA gradient."""
    gm = lrc.transform(make_mlp(), "fc1:lora_fa(r=4, alpha=8)", example_inputs=(inputs(),))
    ad = lrc.adapters(gm)["fc1"]
    with torch.no_grad():
        ad.lora_B.normal_(0, 0.1)
    b0 = ad.lora_B.detach().clone()
    x, t = data()
    (gm(x) - t).pow(2).mean().backward()
    g = ad.lora_B.grad.clone()
    lrc.optimizer(gm, torch.optim.SGD, lr=1.0).step()
    a = ad.lora_A.detach()
    expected = b0 - g @ torch.linalg.inv(a @ a.T) / ad.scaling**2
    torch.testing.assert_close(ad.lora_B.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_forward_and_merge_match_peft(dropout):
    pm = peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SITES), use_dora=True,
                                    lora_dropout=dropout))
    gm = lrc.transform(make_mlp(), f"fc*:dora(r=4, alpha=8, dropout={dropout})", example_inputs=(inputs(),))
    for site in SITES:  # the magnitude init is ‖W‖ per output row on both sides
        torch.testing.assert_close(lrc.adapters(gm)[site].lora_magnitude_vector,
                                   layer(pm, site).lora_magnitude_vector.default.weight)
    copy_lora(pm, gm)
    pm.eval()
    gm.eval()
    x = inputs()
    torch.testing.assert_close(gm(x), pm(x), rtol=0, atol=1e-5)
    if dropout:  # train mode: same dropout mask on both sides gives the same output and grads
        pm.train()
        gm.train()
        torch.manual_seed(11)
        yp = pm(x)
        torch.manual_seed(11)
        yo = gm(x)
        torch.testing.assert_close(yo, yp, rtol=0, atol=1e-5)
        yp.sum().backward()
        yo.sum().backward()
        for site in SITES:
            torch.testing.assert_close(lrc.adapters(gm)[site].lora_magnitude_vector.grad,
                                       layer(pm, site).lora_magnitude_vector.default.weight.grad,
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(lrc.adapters(gm)[site].lora_B.grad,
                                       layer(pm, site).lora_B.default.weight.grad, rtol=1e-4, atol=1e-5)
        pm.eval()
        gm.eval()
    merged_ref = pm.merge_and_unload()
    merged = lrc.merge(gm)
    for site in SITES:
        torch.testing.assert_close(merged.get_parameter(f"{site}.weight"), getattr(merged_ref, site).weight,
                                   rtol=0, atol=1e-5)


def test_vera_shared_matrices_forward_and_merge_match_peft():
    pm = peft_model(peft.VeraConfig(r=8, target_modules=list(SITES), projection_prng_key=0, d_initial=0.1))
    gm = lrc.transform(make_mlp(), "fc*:vera(r=8, d_init=0.1, seed=0)", example_inputs=(inputs(),))
    ads = lrc.adapters(gm)
    full_a, full_b = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    assert full_a.shape == (8, 24) and full_b.shape == (24, 8)  # PEFT: max d_in, max d_out
    for site, (d_out, d_in) in {"fc1": (24, 12), "fc2": (16, 24), "fc3": (10, 16)}.items():
        torch.testing.assert_close(ads[site].vera_A, full_a[:, :d_in], rtol=0, atol=0)
        torch.testing.assert_close(ads[site].vera_B, full_b[:d_out, :], rtol=0, atol=0)
    other = lrc.transform(make_mlp(1), "fc*:vera(r=8)", example_inputs=(inputs(),))
    assert lrc.adapters(other)["fc1"].vera_A is ads["fc1"].vera_A  # one shared tensor per shape
    assert "vera_A" not in ads["fc1"].state_dict()  # regenerated from the seed, not saved
    torch.manual_seed(2)
    with torch.no_grad():
        for site in SITES:
            lay = layer(pm, site)
            lay.vera_lambda_b.default.normal_()
            lay.vera_lambda_d.default.normal_()
            ads[site].vera_lambda_b.copy_(lay.vera_lambda_b.default)
            ads[site].vera_lambda_d.copy_(lay.vera_lambda_d.default)
    pm.eval()
    x = inputs()
    torch.testing.assert_close(gm(x), pm(x), rtol=0, atol=1e-5)
    merged_ref = pm.merge_and_unload()
    merged = lrc.merge(copy.deepcopy(gm))
    for site in SITES:
        torch.testing.assert_close(merged.get_parameter(f"{site}.weight"), getattr(merged_ref, site).weight,
                                   rtol=0, atol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
