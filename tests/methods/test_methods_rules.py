"""Delta-LoRA, LoRA-Pro and LoRASC update rules against formulas computed here; argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.mlp import _lora_pro_setup, _proj, batch, inputs, make_mlp

import lowrank_compiler as lrc
from lowrank_compiler.methods.base import StepContext


def run(gm, steps, opt_cls=torch.optim.AdamW, **kw):
    opt = lrc.optimizer(gm, opt_cls, **kw)
    for i in range(steps):
        x, t = batch(i)
        (gm(x) - t).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_delta_lora_matches_hand_written_training_over_3_steps():
    model = make_mlp()
    gm = lrc.transform(model, "fc1:delta_lora(r=4, alpha=8, ratio=2, start=1)", example_inputs=(inputs(),))
    ad = lrc.adapters(gm)["fc1"]
    # the reference: plain tensors, torch AdamW on (A, B), W moved by hand after steps t > 1
    A, B = ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_()
    W, s = model.fc1.weight.detach().clone(), 8 / 4
    ref_opt = torch.optim.AdamW([A, B], lr=1e-2)
    for t in range(3):
        x, target = batch(t)
        h = F.linear(x, W, model.fc1.bias) + s * F.linear(F.linear(x, A), B)
        y = model.fc3(torch.tanh(model.fc2(torch.relu(h))))
        (y - target).pow(2).mean().backward()
        before = (B @ A).detach()
        ref_opt.step()
        ref_opt.zero_grad()
        if t + 1 > 1:
            W = W + 2 * s * ((B @ A).detach() - before)
    run(gm, 3, lr=1e-2)
    torch.testing.assert_close(gm.get_parameter("fc1.weight"), W, rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.lora_B, B.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(W, model.fc1.weight)  # W moved, and the user's weight did not
    assert gm.get_parameter("fc1.weight") is not model.fc1.weight


def test_lora_pro_equivalent_gradient_is_projection_of_G():
    gm, ad, G = _lora_pro_setup("efficient")
    A, B, s = ad.lora_A.detach().double(), ad.lora_B.detach().double(), ad.scaling
    ga_lora = ad.lora_A.grad.double().clone()
    ad.transform_grads(gm.get_parameter("fc2.weight"), StepContext(1, lambda p: {}, lambda p: {}))
    ga, gb = ad.lora_A.grad.double(), ad.lora_B.grad.double()
    equiv = s * (B @ ga + gb @ A)
    torch.testing.assert_close(equiv, _proj(A, B, G.double()), rtol=1e-3, atol=1e-6)
    # the X in g_A = (1/s²)(BᵀB)⁻¹ g_A^lora + X A solves the Sylvester equation
    btb, aat = B.T @ B, A @ A.T
    X = (ga - torch.linalg.inv(btb) @ ga_lora / s**2) @ A.T @ torch.linalg.inv(aat)
    residual = btb @ X + X @ aat + torch.linalg.inv(btb) @ ga_lora @ A.T / s**2
    assert residual.abs().max() < 1e-4 * max(1.0, (btb @ X).abs().max().item())


def test_lora_pro_at_b_zero():
    gm = lrc.transform(make_mlp(), "fc2:lora_pro(r=4, alpha=8, mode='efficient')", example_inputs=(inputs(),))
    ad = lrc.adapters(gm)["fc2"]
    x, t = batch(0)
    (gm(x) - t).pow(2).mean().backward()
    gb_lora, A = ad.lora_B.grad.clone(), ad.lora_A.detach()
    ad.transform_grads(gm.get_parameter("fc2.weight"), StepContext(1, lambda p: {}, lambda p: {}))
    torch.testing.assert_close(ad.lora_A.grad, torch.zeros_like(A))
    torch.testing.assert_close(ad.lora_B.grad, gb_lora @ torch.linalg.inv(A @ A.T) / ad.scaling**2,
                               rtol=1e-4, atol=1e-6)


def test_lora_pro_full_adamw_first_step():
    """Step 1 of the AdamW variant: BA moves by −lr · proj(m̂ / (√v̂ + eps)), m̂ = g̃, to first order."""
    gm, ad, G = _lora_pro_setup("full")
    A0, B0, s, lr, eps = ad.lora_A.detach().clone(), ad.lora_B.detach().clone(), ad.scaling, 1e-4, 1e-8
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=lr, eps=eps, weight_decay=0.0)
    opt.step()
    equiv = _proj(A0.double(), B0.double(), G.double())
    direction = equiv / (equiv.abs() + eps)
    moved = s * (ad.lora_B.double() @ ad.lora_A.double() - B0.double() @ A0.double()) / -lr
    torch.testing.assert_close(moved, _proj(A0.double(), B0.double(), direction), rtol=0, atol=2e-2)
    assert ad.lora_A.grad is None and ad.lora_B.grad is None  # stepped by the method, skipped by AdamW
    st = opt.state_dict()["state"]
    assert any("lorapro_exp_avg" in v and v["lorapro_exp_avg"].shape == (16, 24) for v in st.values())


def _lorasc(spec_args: str, steps: int, seed: int = 0):
    gm = lrc.transform(make_mlp(seed), f"fc2:lorasc(r=2, alpha=4, {spec_args})", example_inputs=(inputs(),))
    opt = run(gm, steps, lr=1e-2)
    return gm, lrc.adapters(gm)["fc2"], opt


def test_lorasc_cascade_is_continuous_and_reinits_fast_lora():
    gm_nc, ad_nc, _ = _lorasc("cascade_every=1000", 2)  # same run, no cascade yet
    gm, ad, opt = _lorasc("cascade_every=2", 2)
    x = inputs()
    torch.testing.assert_close(gm(x), gm_nc(x), rtol=0, atol=1e-6)  # slow_rate=1, no noise: continuous
    torch.testing.assert_close(gm.get_parameter("fc2.weight"),
                               gm_nc.get_parameter("fc2.weight") + ad_nc.delta_weight(None), rtol=0, atol=1e-6)
    assert torch.count_nonzero(ad.lora_B) == 0 and not torch.equal(ad.lora_A, ad_nc.lora_A)
    assert int(ad.cascades) == 1 and len(opt.state[ad.lora_A]) == 0 and len(opt.state[ad.lora_B]) == 0


def test_lorasc_slow_rate_and_noise():
    gm_nc, ad_nc, _ = _lorasc("cascade_every=1000", 2)
    w_nc = gm_nc.get_parameter("fc2.weight").detach()
    gm, _, _ = _lorasc("cascade_every=2, slow_rate=0.5", 2)
    torch.testing.assert_close(gm.get_parameter("fc2.weight"), w_nc + 0.5 * ad_nc.delta_weight(None),
                               rtol=0, atol=1e-6)
    gm_n, _, _ = _lorasc("cascade_every=2, noise=0.1", 2)
    gm_0, _, _ = _lorasc("cascade_every=2", 2)
    diff = gm_n.get_parameter("fc2.weight") - gm_0.get_parameter("fc2.weight")
    bound = 0.1 * w_nc.std() / 2
    assert 0 < diff.abs().max() <= bound * 1.01 and diff.abs().mean() > bound / 4


def test_lorasc_merged_rank_grows_with_cascades():
    model = make_mlp()
    w0 = model.fc2.weight.detach().clone()
    gm, ad, _ = _lorasc("cascade_every=1", 4)
    assert int(ad.cascades) == 4
    rank = torch.linalg.matrix_rank(gm.get_parameter("fc2.weight").detach() - w0).item()
    assert rank > 2  # r = 2 per cascade: a mixture of low-rank updates
    merged = lrc.merge(gm)
    linears = [n for n in merged.graph.nodes if "linear" in str(n.target)
               or n.op == "call_module" and isinstance(merged.get_submodule(n.target), torch.nn.Linear)]
    assert len(linears) == 3 and not any(isinstance(m, lrc.AdapterMethod) for m in merged.modules())


@pytest.mark.parametrize("spec, word", [
    ("fc*:lora_plus(r=4, ratio=0)", "ratio"),
    ("fc*:lora_plus(r=4, ratio=-2.0)", "ratio"),
    ("fc*:delta_lora(r=4, ratio=0)", "ratio"),
    ("fc*:delta_lora(r=4, start=-1)", "start"),
    ("fc*:vera(r=12)", "r=12"),  # smallest site is 16 x 24 / 10 x 16: fc3 has d_out 10
    ("fc*:lorasc(r=4)", "cascade_every"),
    ("fc*:lorasc(r=4, cascade_every=0)", "cascade_every"),
    ("fc*:lorasc(r=4, cascade_every=5, slow_rate=0)", "slow_rate"),
    ("fc*:lorasc(r=4, cascade_every=5, noise=-1)", "noise"),
    ("fc*:lora_pro(r=4, mode='fast')", "mode"),
    ("fc*:dora(r=4, dropout=1.5)", "dropout"),
])
def test_bad_arguments_raise_spec_error_naming_them(spec, word):
    with pytest.raises(lrc.errors.SpecError, match=word):
        lrc.transform(make_mlp(), spec, example_inputs=(inputs(),))
