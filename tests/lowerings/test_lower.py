"""Training lowerings (lowerings/fast_*.py, lowerings/kernels.py) against the unlowered graph and formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.fuse import _setup as fuse_setup

import lowrank_compiler as lrc
from lowrank_compiler.backends.torch_compile import fuse_optimizer
from lowrank_compiler.errors import ExportError
from lowrank_compiler.lowerings import kernels as ck
from lowrank_compiler.lowerings import lower


def _setup():
    """Tiny BERT, LoRA on q/k/v (r=4) and attention.output.dense (r=2), random B, a padded row."""
    return fuse_setup("bert")


def _h(out):
    return out.last_hidden_state


def _assert_eval_equal(gm, lowered, ids, mask) -> dict:
    """In eval mode (dropout off: the same function), ``lowered`` gives ``gm``'s output and the same gradients
    on ``gm``'s trainable parameters; returns those gradients."""
    gm.eval()
    lowered.eval()
    outs, grads = [], []
    for g in (gm, lowered):
        out = _h(g(ids, attention_mask=mask))
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad})
        gm.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)
    return grads[0]


def _train(model, owner, ids, mask, steps=3, opt=None):
    opt = opt or lrc.optimizer(owner, torch.optim.AdamW, lr=1e-2)
    target = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = (_h(model(ids, attention_mask=mask)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_lowered_graph_equals_unlowered_forward_and_grads():
    gm, ids, mask = _setup()
    low = lower(gm)
    called = [type(low.get_submodule(n.target)) for n in low.graph.nodes if n.op == "call_module"]
    assert called.count(ck.LoweredLoRA) == 8 and called.count(ck.FastAttention) == 2 and called.count(ck.FastDropout) == 5
    assert len(called) == 15
    assert sum(n.target is ck.linear for n in low.graph.nodes) == 5  # 2 × FFN + pooler
    assert lrc.adapters(gm) and not lrc.adapters(low)  # the adapters stay gm's
    grads = _assert_eval_equal(gm, low, ids, mask)
    assert len(grads) == 16


def test_training_through_the_lowered_graph_trains_gm():
    gm, ids, mask = _setup()
    ref = copy.deepcopy(gm)
    base = {n: p.clone() for n, p in gm.named_parameters() if not p.requires_grad}
    for m in (gm, ref):
        m.eval()  # no dropout: the curves must agree
    low = lower(gm)
    low.eval()
    want = _train(ref, ref, ids, mask)
    got = _train(low, gm, ids, mask)
    assert got == pytest.approx(want, rel=1e-5) and got[-1] < got[0]
    for (n, a), b in zip(lrc.adapters(gm).items(), lrc.adapters(ref).values()):
        torch.testing.assert_close(a.lora_A, b.lora_A, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(a.lora_B, b.lora_B, rtol=1e-5, atol=1e-6, msg=n)
    low.train()  # dropout on: base weights stay, the loss still goes down
    torch.manual_seed(0)
    losses = _train(low, gm, ids, mask, steps=6)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base[n]) for n, p in gm.named_parameters() if n in base)


def test_lowered_linear_trains_an_unfrozen_weight_like_f_linear():
    x = torch.randn(5, 3, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    g = torch.randn(5, 3, 6)
    got = torch.autograd.grad((ck.linear(x, w, b) * g).sum(), (x, w, b))
    want = torch.autograd.grad((F.linear(x, w, b) * g).sum(), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_keep_mask_and_dropout():
    torch.manual_seed(0)
    keep = ck.keep_mask(torch.empty(1_000_000), 0.1)
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.9) < 2e-3  # ~7 sigma
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(1)
    y = ck.dropout(x, 0.25)
    torch.manual_seed(1)
    m = ck.keep_mask(x, 0.25)
    torch.testing.assert_close(y, x * m / 0.75)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, m / 0.75)


def test_attention_with_dropout_equals_the_formula_and_sdpa_without():
    torch.manual_seed(0)
    b, h, s, d, p = 2, 3, 5, 4, 0.3
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    allowed = torch.ones(b, 1, s, s, dtype=torch.bool)
    allowed[0, :, :, -2:] = False  # padding
    allowed[1, :, 2, :] = False  # a fully masked row: SDPA gives 0
    torch.manual_seed(7)
    out = ck.attention(q, k, v, allowed, p)
    torch.manual_seed(7)
    keep = ck.keep_mask(torch.empty(b, h, s, s), p)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    ref = (probs * keep / (1 - p)) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1, :, 2], torch.zeros(h, d))
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    additive = torch.zeros(b, 1, s, s).masked_fill(~allowed, float("-inf"))  # the traced path's code
    torch.manual_seed(7)
    torch.testing.assert_close(ck.attention(q, k, v, additive, p), ref, rtol=1e-5, atol=1e-6)
    sdpa = ck.FastAttention(p).eval()  # eval: no dropout, plain SDPA
    torch.testing.assert_close(sdpa(q, k, v, allowed), F.scaled_dot_product_attention(q, k, v, allowed))


def test_fuse_optimizer_steps_the_same_params_as_lrc_optimizer():
    gm, ids, mask = _setup()
    gm.eval()
    ref = copy.deepcopy(gm)
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    assert fuse_optimizer(opt) is opt and all(g["fused"] for g in opt.param_groups)
    want = _train(ref, ref, ids, mask, steps=2)
    got = _train(gm, gm, ids, mask, steps=2, opt=opt)
    assert got == pytest.approx(want, rel=1e-5)
    for (n, p), q in zip(gm.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_lower_errors():
    gm, _, _ = _setup()
    with pytest.raises(ExportError, match="unknown lowering.*'nope'.*valid: lora, linear, dropout"):
        lower(gm, skip=("nope",))
    with pytest.raises(ExportError, match="needs a GraphModule"):
        lower("model.pt")
    with pytest.raises(ExportError, match="pick one"):
        lrc.compile(gm, lower=True, merge=True)
    with pytest.raises(ExportError, match="torch.optim.Optimizer"):
        fuse_optimizer("adam")


@pytest.mark.slow
def test_inductor_compiled_lowered_training_equals_eager_lrc():
    """lrc.compile(gm, lower=True, optimizer=opt): forward, backward and fused AdamW step (≈ 50 s)."""
    gm, ids, mask = _setup()
    ref = copy.deepcopy(gm)
    base = {n: p.clone() for n, p in gm.named_parameters() if not p.requires_grad}
    for m in (gm, ref):
        m.eval()
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    fast = lrc.compile(gm, lower=True, optimizer=opt)
    assert all(g["fused"] for g in opt.param_groups)
    want = _train(ref, ref, ids, mask)
    got = _train(fast, gm, ids, mask, opt=opt)
    assert got == pytest.approx(want, rel=1e-4)
    for (n, p), q in zip(gm.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    fast.train()  # dropout on (recompiles once for the mode): base untouched, loss goes down
    torch.manual_seed(0)
    losses = _train(fast, gm, ids, mask, steps=6, opt=opt)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base[n]) for n, p in gm.named_parameters() if n in base)


def test_lower_both_composes():
    """goal="both": the memory kernels stay, the GEMMs are lowered; eval outputs and gradients equal gm's, and a
    train-mode step through it trains gm's adapters."""
    from lowrank_compiler.lowerings.lean_attention import LeanAttention
    from lowrank_compiler.lowerings.lean_dropout import LeanDropout

    gm, ids, mask = _setup()
    both = lower(gm, "both")
    called = [type(both.get_submodule(n.target)) for n in both.graph.nodes if n.op == "call_module"]
    assert called.count(LeanAttention) == 2 and called.count(LeanDropout) == 5  # memory kept
    assert called.count(ck.LoweredLoRA) == 8 and ck.FastAttention not in called  # speed on top, no second attention
    assert sum(n.target is ck.linear for n in both.graph.nodes) == 5
    _assert_eval_equal(gm, both, ids, mask)
    gm.train()
    both.train()
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    losses = _train(both, gm, ids, mask, steps=2)
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(p, before[n]) for n, p in gm.named_parameters() if p.requires_grad)


def test_lower_goal_errors():
    gm, _, _ = _setup()
    with pytest.raises(lrc.LrcError, match="goal='fast' is not one of 'speed', 'memory', 'both'"):
        lower(gm, "fast")
