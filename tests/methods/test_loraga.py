"""LoRA-GA (exact): init parity, A0/B0 vs an autograd + full-SVD reference, first step, offset, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from helpers.common import example_ids, hidden, make_hf
from helpers.loraga import (
    batches,
    captured_energy,
    loraga_adapters,
    projector_cols,
    projector_rows,
    reference_grads,
    target_loss,
    traced,
)

import lowrank_compiler as lrc
from lowrank_compiler.passes.initialize import initialize

SPEC = {
    "gpt2": "attn.c_attn:loraga(r=4, alpha=8); mlp.c_fc:loraga(r=4, alpha=8)",
    "bert": "attention.self.*:loraga(r=4, alpha=8); intermediate.dense:loraga(r=4, alpha=8)",
    "llama": "self_attn.*:loraga(r=4, alpha=8); mlp.up_proj:loraga(r=4, alpha=8)",
}


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_init_output_parity(kind):
    model = make_hf(kind)
    ids = example_ids()
    ref = hidden(model(ids))
    gm = lrc.transform(model, SPEC[kind], example_inputs=(ids,), data=batches(3), loss_fn=target_loss(32),
                       init_batches=2, progress=False)
    ads = loraga_adapters(gm)
    assert len(ads) >= 4 and all(bool(a.initialized) for a in ads.values())
    assert all(a.lora_B.abs().sum() > 0 for a in ads.values())  # really initialized, B != 0
    torch.testing.assert_close(hidden(gm(ids)), ref, atol=1e-5, rtol=0)
    # the user's model keeps its weights: the offset lives in new Parameter objects
    torch.testing.assert_close(hidden(model(ids)), ref, atol=0, rtol=0)


def _setup_bert(direction="ArB2r", n=3, r=4, extra=""):
    model, base = traced("bert", dropout=False)
    data, loss_fn = batches(n), target_loss(32)
    site = "encoder.layer.1.attention.self.query"
    W0 = model.get_parameter(f"{site}.weight").detach().clone()
    G = reference_grads(model, [site], data, loss_fn)[site]
    gm = lrc.transform(base, f"layer.1.attention.self.query:loraga(r={r}, alpha=8, direction={direction!r}{extra})",
                       example_inputs=(data[0][0],), data=data, loss_fn=loss_fn, progress=False)
    return model, gm, site, W0, G, data, loss_fn


def test_matches_autograd_full_svd_reference():
    _, gm, site, W0, G, _, _ = _setup_bert()
    a = lrc.adapters(gm)[site]
    r = a.r
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert S[r - 1] / S[r] > 1.02 and S[2 * r - 1] / S[2 * r] > 1.02, "test needs separated singular values"
    c = 32 ** 0.25 / 16 ** 0.5  # stable scale d_out^(1/4)/sqrt(gamma)
    A0, B0 = a.lora_A.detach(), a.lora_B.detach()
    # A0 = c·Vᵀ[0:r], B0 = c·U[:, r:2r]: orthogonal rows/cols of norm c ...
    torch.testing.assert_close(A0 @ A0.t(), c * c * torch.eye(r), atol=1e-4, rtol=0)
    torch.testing.assert_close(B0.t() @ B0, c * c * torch.eye(r), atol=1e-4, rtol=0)
    # ... spanning the reference subspaces (sign-invariant: compare projectors)
    torch.testing.assert_close(projector_rows(A0), projector_rows(Vh[:r].float()), atol=2e-3, rtol=0)
    torch.testing.assert_close(projector_cols(B0), projector_cols(U[:, r:2 * r].float()), atol=2e-3, rtol=0)
    # vector by vector up to sign where the spectrum is well separated
    cos_a = (A0 / c * Vh[:r].float()).sum(1).abs()
    assert cos_a[0] > 0.999
    # the offset: W = W0 − s·B0 A0, and A0/B0 kept as buffers
    torch.testing.assert_close(gm.get_parameter(f"{site}.weight").detach(), W0 - a.scaling * B0 @ A0,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(a.init_A, A0, atol=0, rtol=0)
    torch.testing.assert_close(a.original_weight(gm.get_parameter(f"{site}.weight")), W0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", ["ArB2r"] + [pytest.param(d, marks=pytest.mark.slow)
                                                     for d in ("A2rBr", "ArBr", "random")])
def test_first_step_is_best_rank_2r_step(direction):
    """One SGD step on (A, B) moves W_eff by −η s² c² · (best rank-2r approximation of G) to first order."""
    _, gm, site, _, G, data, loss_fn = _setup_bert(direction)
    a = lrc.adapters(gm)[site]
    r, s = a.r, a.scaling
    c2 = (32 ** 0.25 / 16 ** 0.5) ** 2
    A0, B0 = a.lora_A.detach().double().clone(), a.lora_B.detach().double().clone()
    eta = 1e-3 / float(G.norm())  # a small step relative to the weights (second-order term ~1e-3)
    opt = torch.optim.SGD([a.lora_A, a.lora_B], lr=eta)
    gm.train()
    for batch in data:  # the same batches: mean gradient = G (output at init is unchanged)
        (loss_fn(gm(*batch), batch) / len(data)).backward()
    opt.step()
    moved = a.lora_B.detach().double() @ a.lora_A.detach().double() - B0 @ A0
    step = (s * moved / (-eta * s * s * c2)).float()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    G2r = U[:, : 2 * r] @ torch.diag(S[: 2 * r]) @ Vh[: 2 * r]
    rel = (step - G2r).norm() / G2r.norm()
    assert rel < 1e-2, rel
    # a rank-r split of only the top r directions would be far worse: the property is not vacuous
    Gr = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    assert (Gr - G2r).norm() / G2r.norm() > 10 * rel


def test_direction_splits_and_energy():
    """ArB2r puts v1 in A0's row space and u1 outside B0's column space; A2rBr the other way round."""
    for direction, v1_in_a in (("ArB2r", True), ("A2rBr", False)):
        _, gm, site, _, G, _, _ = _setup_bert(direction)
        a = lrc.adapters(gm)[site]
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        pa = (projector_rows(a.lora_A.detach()) @ Vh[0]).norm()
        pb = (projector_cols(a.lora_B.detach()) @ U[:, 0]).norm()
        assert (pa > 0.99) == v1_in_a and (pb > 0.99) != v1_in_a
        top2r = float(S[: 2 * a.r].pow(2).sum())
        assert captured_energy(G, a.lora_A.detach(), a.lora_B.detach()) / top2r > 0.999


def test_deterministic_with_dropout_and_seed():
    data, loss_fn = batches(2), target_loss(32)

    def run(seed):
        gm = lrc.transform(traced("bert")[1], f"attention.self.query:loraga(r=4, seed={seed})", example_inputs=(data[0][0],),
                           data=data, loss_fn=loss_fn, progress=False)
        return torch.cat([a.lora_B.detach().flatten() for a in lrc.adapters(gm).values()])

    torch.manual_seed(123)
    x = run(0)
    y = run(0)
    torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not torch.allclose(x.abs(), run(1).abs(), atol=1e-4)


def test_caller_rng_untouched_and_modes_restored():
    data, loss_fn = batches(2), target_loss(32)
    base = traced("bert")[1]
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    gm = lrc.transform(base, "attention.self.query:loraga(r=4)", example_inputs=(data[0][0],), data=data,
                       loss_fn=loss_fn, progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert not gm.training
    assert all(p.requires_grad for a in lrc.adapters(gm).values() for p in a.parameters())
    assert all(p.grad is None for p in gm.parameters())
    assert not any(p.requires_grad for n, p in gm.named_parameters() if ".adapter." not in n)


def test_bf16_base_fp32_adapters():
    model = make_hf("llama").to(torch.bfloat16)
    ids = example_ids()
    ref = hidden(model(ids)).float()
    gm = lrc.transform(model, SPEC["llama"], example_inputs=(ids,), data=batches(2),
                       loss_fn=lambda out, b: hidden(out).float().pow(2).mean(), progress=False)
    site, a = next(iter(lrc.adapters(gm).items()))
    assert a.lora_A.dtype == a.lora_B.dtype == a.init_A.dtype == torch.float32
    assert gm.get_parameter(f"{site}.weight").dtype == torch.bfloat16
    out = hidden(gm(ids))
    assert out.dtype == torch.bfloat16
    # only the bf16 rounding of W − s·B0A0 separates them
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    out.float().pow(2).mean().backward()
    assert a.lora_A.grad is not None and a.lora_A.grad.dtype == torch.float32


def test_missing_data_or_loss_fn_says_what_to_pass():
    with pytest.raises(lrc.errors.InitError, match=r"pass data and loss_fn to transform\(\).*loss_fn=lambda output, batch"):
        lrc.transform(traced("bert")[1], "attention.self.query:loraga(r=4)")
    with pytest.raises(lrc.errors.InitError, match=r"pass loss_fn"):
        lrc.transform(traced("bert")[1], "attention.self.query:loraga(r=4)", data=batches(1))


def test_non_finite_gradient_names_site_and_batch():
    bad = batches(3)
    calls = []

    def loss2(out, batch):  # batch 1: a finite loss (0) whose gradient is NaN (sqrt'(0)·sign(0))
        calls.append(1)
        h = hidden(out)
        return (h - h.detach()).abs().sqrt().sum() if len(calls) == 2 else h.pow(2).mean()

    with pytest.raises(lrc.errors.InitError, match=r"non-finite gradient at site 'encoder\.layer\.0\.attention\.self\."
                                            r"query' in batch 1"):
        lrc.transform(traced("bert")[1], "attention.self.*:loraga(r=4)", data=bad, loss_fn=loss2,
                      progress=False)
    with pytest.raises(lrc.errors.InitError, match=r"loss is non-finite .* at batch 0"):
        lrc.transform(traced("bert")[1], "attention.self.*:loraga(r=4)", data=bad,
                      loss_fn=lambda out, b: hidden(out).sum() * float("inf"), progress=False)
    with pytest.raises(lrc.errors.InitError, match=r"scalar"):
        lrc.transform(traced("bert")[1], "attention.self.*:loraga(r=4)", data=bad,
                      loss_fn=lambda out, b: hidden(out), progress=False)
    with pytest.raises(lrc.errors.InitError, match=r"no batches"):
        lrc.transform(traced("bert")[1], "attention.self.*:loraga(r=4)", data=[],
                      loss_fn=target_loss(32), progress=False)


def test_site_the_loss_does_not_reach_is_an_error():
    with pytest.raises(lrc.errors.InitError, match=r"no gradient reached site\(s\) \['pooler\.dense'\].*exclude"):
        lrc.transform(traced("bert")[1], "attention.self.query:loraga(r=4); pooler.dense:loraga(r=4)",
                      data=batches(1), loss_fn=target_loss(32), progress=False)


def test_bad_args_and_rank_too_large():
    with pytest.raises(lrc.errors.SpecError, match="direction"):
        lrc.transform(traced("bert")[1], "attention.self.query:loraga(r=4, direction='AB')")
    with pytest.raises(lrc.errors.SpecError, match=r"2r=40 exceeds"):
        lrc.transform(traced("bert")[1], "attention.self.query:loraga(r=20)")


def test_initialize_pass_is_idempotent():
    data = batches(2)
    gm = lrc.transform(traced("bert")[1], "attention.self.query:loraga(r=4)", example_inputs=(data[0][0],), data=data,
                       loss_fn=target_loss(32), progress=False)
    w = {n: p.detach().clone() for n, p in gm.named_parameters()}
    assert initialize(gm, data, target_loss(32), progress=False).modified is False
    assert all(torch.equal(w[n], p) for n, p in gm.named_parameters())
