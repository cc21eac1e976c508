"""LoRA.forward's fused in-place path against the plain formula y = x Wᵀ + b + s·(x Aᵀ) Bᵀ: values and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowrank_compiler.methods.base import SiteInfo
from lowrank_compiler.methods.lora import LoRA


def _lora(d_in: int = 12, d_out: int = 10, r: int = 3, dtype: torch.dtype = torch.float32, **kw) -> LoRA:
    torch.manual_seed(0)
    m = LoRA(SiteInfo("site", d_in, d_out, dtype), **LoRA.resolve_args({"r": r, "alpha": 6, **kw}))
    with torch.no_grad():
        m.lora_B.normal_()
    return m


@pytest.mark.parametrize("shape", [(5, 12), (2, 4, 12), (2, 3, 2, 12), (0, 12)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_forward_and_grads_match_formula(shape, with_bias):
    m = _lora()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 12, generator=g, requires_grad=True)
    b = torch.randn(10, generator=g, requires_grad=True) if with_bias else None
    x = torch.randn(*shape, generator=g, requires_grad=True)
    y = m(x, w, b)
    ref = x @ w.t() + (b if b is not None else 0) + 2.0 * (x @ m.lora_A.t()) @ m.lora_B.t()
    assert y.shape == (*shape[:-1], 10)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y.shape, generator=g)
    tensors = [x, w, m.lora_A, m.lora_B] + ([b] if b is not None else [])
    got = torch.autograd.grad(y, tensors, gy)
    want = torch.autograd.grad(ref, tensors, gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_noncontiguous_input_and_inputs_untouched():
    m = _lora()
    x = torch.randn(12, 6).t()  # (6, 12), non-contiguous
    w, b = torch.randn(10, 12), torch.randn(10)
    x0, w0, b0 = x.clone(), w.clone(), b.clone()
    y = m(x, w, b)
    torch.testing.assert_close(y, F.linear(x0, w0, b0) + 2.0 * F.linear(F.linear(x0, m.lora_A), m.lora_B))
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(b, b0)


def test_dtype_mismatch_falls_back_to_adapter_dtype():
    m = _lora()  # fp32 adapter on a bf16 base
    x, w = torch.randn(4, 12, dtype=torch.bfloat16), torch.randn(10, 12, dtype=torch.bfloat16)
    y = m(x, w, None)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, w).float() + 2.0 * (x.float() @ m.lora_A.t()) @ m.lora_B.t()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)


def test_merged_flag_computes_plain_linear():
    m = _lora()
    m.merged = True
    x, w, b = torch.randn(3, 12), torch.randn(10, 12), torch.randn(10)
    torch.testing.assert_close(m(x, w, b), F.linear(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 7, 8, 64])
def test_no_grad_inference_matches_formula_on_both_sides_of_the_threshold(rows):
    m = _lora().eval()
    x, w, b = torch.randn(rows, 12), torch.randn(10, 12), torch.randn(10)
    with torch.no_grad():
        y = m(x, w, b)
        assert m._merge_on_the_fly(x, w, b) == (rows * (12 + 20) > 2 * 12 * 10)
    ref = x @ w.t() + b + 2.0 * (x @ m.lora_A.t()) @ m.lora_B.t()
    torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-5)


def test_merge_on_the_fly_only_without_grads_or_active_dropout():
    m = _lora(dropout=0.5)
    x, w = torch.randn(64, 12), torch.randn(10, 12)
    assert not m._merge_on_the_fly(x, w, None)  # grad enabled and lora_A requires grad
    with torch.no_grad():
        assert not m.train()._merge_on_the_fly(x, w, None)  # dropout active in training mode
        assert m.eval()._merge_on_the_fly(x, w, None)
    m.requires_grad_(False)
    assert m._merge_on_the_fly(x, w, None)  # nothing needs a gradient


@pytest.mark.slow
def test_inserted_adapters_follow_the_graph_mode():
    from helpers.common import example_ids, make_hf

    import lowrank_compiler as lrc

    model = make_hf("bert")
    ids = example_ids()
    gm = lrc.transform(model, "attention.self.query:lora(r=4, dropout=0.5)", (ids,))
    assert not gm.training and all(not a.training for a in lrc.adapters(gm).values())
    for a in lrc.adapters(gm).values():
        with torch.no_grad():
            a.lora_B.normal_()
    with torch.no_grad():  # eval: the adapter dropout is off, so two calls agree exactly
        torch.testing.assert_close(gm(ids).last_hidden_state, gm(ids).last_hidden_state, rtol=0, atol=0)
