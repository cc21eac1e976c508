"""Training kernels that the lowering passes (``lowerings/fast_*.py``) put into a graph.

What the profile of a LoRA training step (MiniLM 16×128, CPU) asked for, each with the same math as the
op it replaces:

- :func:`linear` / :class:`LoRALinear`: the base GEMMs of frozen weights through oneDNN
  (``mkldnn._linear_pointwise``), 12–19 % faster than MKL's sgemm on this AMD EPYC, forward and
  ∂x (``g @ W`` reads W transposed in place). LoRA gets a hand-written backward: ∂A as ``dhᵀ x`` (the
  fast GEMM layout; autograd's ``xᵀ dh`` is 2× slower), the A-branch ∂x accumulated into the base
  ∂x in place (no extra N × d_in tensor and addition), ∂W/∂b only when they require grad.
- :func:`keep_mask` / :func:`dropout`: a keep mask from 31 random bits per element (``random_`` on int32,
  2.5× cheaper than ``bernoulli_``; keep probability 1 − p up to 2⁻³¹), applied with the one-pass
  ``native_dropout_backward(x, mask, 1/(1-p))``. ``keep_mask`` is a custom op, so inductor fuses the
  mask's use but does not replace it with its scalar per-element Philox (3× slower on CPU).
- :func:`attention`: SDPA with dropout written out (GEMM, masked softmax, dropout, GEMM) so that the
  mask above is used; CPU SDPA has no fused kernel with dropout and falls back to this math anyway.

The random stream differs from torch's ``bernoulli_`` (as inductor's does); the distribution does not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_MASK_BITS = 2 ** 31  # int32 random_() draws uniformly from [0, 2**31)
_ONEDNN = torch.backends.mkldnn.is_available()


@torch.library.custom_op("lrc::keep_mask", mutates_args=())
def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool tensor shaped like ``x``: True with probability 1 − p (dropout's keep mask)."""
    r = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()
    return r >= int(round(p * _MASK_BITS))


@keep_mask.register_fake
def _(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` (0 < p < 1): ``x · mask / (1 − p)`` with :func:`keep_mask`."""
    return torch.ops.aten.native_dropout_backward(x, keep_mask(x, p), 1.0 / (1.0 - p))


def onednn_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether oneDNN's linear serves ``x @ wᵀ`` (fp32 on CPU with oneDNN built in)."""
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and x.dim() >= 1
            and _ONEDNN)


@torch.library.custom_op("lrc::onednn_linear", mutates_args=())
def _gemm(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ wᵀ + b`` for 2-D ``x2`` through oneDNN (``w`` may be a transposed view). A custom op:
    inductor calls it as is (its own mkldnn linear lowering needs frozen constant weights)."""
    return torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "")


@_gemm.register_fake
def _(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x2.new_empty((x2.shape[0], w.shape[0]))


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x2 if w.requires_grad else None, w)
        return _gemm(x2, w, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, w = ctx.saved_tensors
        g = g.contiguous()
        dx = _gemm(g, w.t(), None) if ctx.needs_input_grad[0] else None
        dw = g.t().mm(x2) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the GEMMs (forward and ∂x) through oneDNN where :func:`onednn_ok`."""
    if not onednn_ok(x, weight) or (bias is not None and bias.dtype != weight.dtype):
        return F.linear(x, weight, bias)
    out = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


class LoRALinear(torch.autograd.Function):
    """``x Wᵀ + b + s · (x Aᵀ) Bᵀ`` for 2-D x, with the backward described in the module docstring."""

    @staticmethod
    def forward(ctx, x2, w, b, a, bm, s: float):
        out = _gemm(x2, w, b)
        h = _gemm(x2, a, None)
        out.addmm_(h, bm.t(), alpha=s)
        ctx.save_for_backward(x2, h, w, a, bm)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx, g):
        x2, h, w, a, bm = ctx.saved_tensors
        s = ctx.s
        g = g.contiguous()
        dh = _gemm(g, bm.t(), None).mul_(s)  # N × r: ∂ of x Aᵀ (oneDNN: 3× MKL's g @ B here)
        dx = dw = db = da = dbm = None
        if ctx.needs_input_grad[0]:
            dx = _gemm(g, w.t(), None)
            dx.addmm_(dh, a)
        if ctx.needs_input_grad[1]:
            dw = g.t().mm(x2)
        if ctx.needs_input_grad[2]:
            db = g.sum(0)
        if ctx.needs_input_grad[3]:
            da = dh.t().mm(x2)
        if ctx.needs_input_grad[4]:
            dbm = h.t().mm(g).mul_(s).t()
        return dx, dw, db, da, dbm, None


class LoweredLoRA(nn.Module):
    """A LoRA adapter (shared, not copied) run through :class:`LoRALinear`; same call as the adapter."""

    def __init__(self, adapter: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ad = self.adapter
        if ad.passthrough:
            return linear(x, weight, bias)
        if (not onednn_ok(x, weight) or x.dtype != ad.lora_A.dtype or x.dim() < 2
                or ad._merge_on_the_fly(x, weight, bias)):
            return ad(x, weight, bias)
        out = LoRALinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, ad.lora_A, ad.lora_B, float(ad.scaling))
        return out.view(*x.shape[:-1], out.shape[-1])


class FastDropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout` in training mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _Attention(torch.autograd.Function):
    """Eager attention with dropout in the fewest passes over the B·H·S² scores: the scales go on the
    B·H·S·D side (q before QKᵀ, 1/(1-p) on the output), the mask is filled in place, and only the
    probabilities and the bool keep mask are saved (the dropped probabilities are recomputed)."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, p: float, s: float):
        qs = q * s
        scores = torch.matmul(qs, k.transpose(-2, -1))
        if allowed is not None:
            scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, -1)
        if allowed is not None:
            dead = ~allowed.any(-1, keepdim=True)  # rows with every key masked: 0, as SDPA's
            if bool(dead.any()):
                probs.masked_fill_(dead, 0.0)
        keep = keep_mask(probs, p)
        out = torch.matmul(torch.where(keep, probs, 0.0), v).mul_(1.0 / (1.0 - p))  # where: no bool→float cast
        ctx.save_for_backward(qs, k, v, probs, keep)
        ctx.p, ctx.s = p, s
        return out

    @staticmethod
    def backward(ctx, go):
        qs, k, v, probs, keep = ctx.saved_tensors
        go = go * (1.0 / (1.0 - ctx.p))
        dv = torch.matmul(torch.where(keep, probs, 0.0).transpose(-2, -1), go)
        dprobs = torch.where(keep, torch.matmul(go, v.transpose(-2, -1)), 0.0)
        dscores = torch._softmax_backward_data(dprobs, probs, -1, probs.dtype)  # 0 wherever probs is 0
        dq = torch.matmul(dscores, k).mul_(ctx.s)
        dk = torch.matmul(dscores.transpose(-2, -1), qs)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, p: float,
              scale: float | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` with dropout p > 0 (training), non-causal, same heads for q/k/v;
    a bool ``attn_mask`` marks the allowed keys, a float one is added to the scores."""
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not torch.compiler.is_compiling() and (attn_mask is None or attn_mask.dtype == torch.bool):
        return _Attention.apply(q, k, v, attn_mask, p, s)
    # traced (inductor fuses the elementwise work itself) or an additive float mask
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(s)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.ops.aten._safe_softmax(scores, -1)  # rows with every key masked give 0, as SDPA's
    return torch.matmul(dropout(probs, p), v)


class FastAttention(nn.Module):
    """SDPA whose attention dropout applies only in training mode, through :func:`attention` (same call
    as the module it replaces: ``(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False)``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if self.training and self.p > 0 and not is_causal and not enable_gqa and q.shape[:-2] == k.shape[:-2]:
            return attention(q, k, v, attn_mask, self.p, scale)
        p = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)

    def extra_repr(self) -> str:
        return f"p={self.p}"
