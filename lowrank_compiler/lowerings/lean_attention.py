"""Attention with dropout that keeps q, k, v and a 1-byte dropout mask for backward, not three T×T float maps.

torch's CPU SDPA refuses dropout in its fused kernel ("Both fused kernels do not support non-zero
dropout"), so a traced ``TrainOnlySDPA`` in training runs the math path, and autograd keeps per layer the
softmax output P, the dropout noise and the dropped probabilities P·noise: three (B, H, T, T) float maps
(12 MiB each for MiniLM at 16×128). This pass replaces each such call by :class:`LeanAttention`, a custom
autograd Function computing the same ops in the same order (outputs and gradients are bitwise those of
the unrewritten graph under the same RNG state) that saves

- ``recompute=True`` (default): q, k, v and the dropout mask; backward recomputes QKᵀ and the softmax
  (one extra (T×D)·(D×T) GEMM and a softmax per layer): 3 × 4 bytes per T×T element become 1 byte;
- ``recompute=False``: P, q, k, v and the mask; backward recomputes only P·noise (elementwise, no GEMM):
  3 × 4 bytes become 4 + 1 (the graph-rewrite form: no recompute cost);
- ``mask="rng"`` instead of ``"bool"``: not the mask but the CPU generator state before its draw (5 KiB),
  replayed in backward on a private generator (one extra ``bernoulli_`` per layer, the global RNG untouched).

Outside that case (eval mode, no grad, CUDA where the fused kernels keep only the RNG offsets, half
precision, GQA, a mask that requires grad) the call is exactly ``F.scaled_dot_product_attention``.
This is a *lowering*: the result shares every module, parameter and buffer with ``gm`` (the attention's
dropout module too, so ``gm.train()``/``gm.eval()`` switch it); build the optimizer, save, merge and
export from ``gm``, run training steps through the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowrank_compiler.errors import LrcError
from lowrank_compiler.ir import TrainOnlySDPA, delete_submodule, finalize, fresh_name, replace_with_module, shared_copy
from lowrank_compiler.passes.manager import PassResult

MASKS = ("bool", "rng")


def _float_mask(mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The additive mask the math path adds to the scores (a bool mask becomes 0 / -inf, as torch does)."""
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask.logical_not(), float("-inf"))


def _scores(q: torch.Tensor, k: torch.Tensor, sf: float, fmask: torch.Tensor | None):
    """(q·sf, kᵀ·sf, softmax(q·sf kᵀ·sf + mask)): the math path's ops in its order."""
    query = q * sf
    kt = k.transpose(-2, -1) * sf
    attn = torch.matmul(query, kt)
    if fmask is not None:
        attn.add_(fmask)
    return query, kt, torch.ops.aten._safe_softmax(attn, -1)


class _LeanSDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, is_causal: bool, sf: float, recompute: bool, replay: bool):
        _, _, probs = _scores(q, k, sf, _float_mask(mask, is_causal, q, k))
        ctx.rng = torch.get_rng_state() if replay else None
        noise = torch.empty_like(probs).bernoulli_(1 - p)  # torch's CPU dropout: the same draws, same order
        keep = None if replay else noise.to(torch.bool)
        noise.div_(1 - p)
        out = torch.matmul(probs * noise, v)
        ctx.cfg = (p, is_causal, sf, recompute, probs.shape)
        ctx.save_for_backward(q, k, v, keep, mask if recompute else probs)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, keep, extra = ctx.saved_tensors
        p, is_causal, sf, recompute, shape = ctx.cfg
        if recompute:
            query, kt, probs = _scores(q, k, sf, _float_mask(extra, is_causal, q, k))
        else:
            query, kt, probs = q * sf, k.transpose(-2, -1) * sf, extra
        if keep is None:
            gen = torch.Generator(device=q.device)
            gen.set_state(ctx.rng)
            noise = torch.empty(shape, dtype=probs.dtype, device=probs.device).bernoulli_(1 - p, generator=gen)
        else:
            noise = keep.to(probs.dtype)
        noise.div_(1 - p)
        d_dropped = torch.matmul(d_out, v.transpose(-2, -1))
        dv = torch.matmul((probs * noise).transpose(-2, -1), d_out) if ctx.needs_input_grad[2] else None
        d_attn = torch._softmax_backward_data(d_dropped * noise, probs, -1, probs.dtype)
        dq = torch.matmul(d_attn, kt.transpose(-2, -1)) * sf if ctx.needs_input_grad[0] else None
        dk = (torch.matmul(query.transpose(-2, -1), d_attn) * sf).transpose(-2, -1) if ctx.needs_input_grad[1] else None
        return dq, dk, dv, None, None, None, None, None, None


class LeanAttention(nn.Module):
    """``TrainOnlySDPA`` (shared, it keeps p and the mode) whose training math path saves q, k, v and a mask."""

    def __init__(self, inner: nn.Module, recompute: bool = True, mask: str = "bool") -> None:
        super().__init__()
        self.inner = inner
        self.recompute = recompute
        self.replay = mask == "rng"

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        p = float(self.inner.p) if self.inner.training else 0.0
        if _lean_applies(q, k, v, attn_mask, p, is_causal, scale, enable_gqa):
            sf = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
            return _LeanSDPA.apply(q, k, v, attn_mask, p, is_causal, sf, self.recompute, self.replay)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)

    def extra_repr(self) -> str:
        return f"p={self.inner.p}, recompute={self.recompute}, mask={'rng' if self.replay else 'bool'}"


def _lean_applies(q, k, v, mask, p, is_causal, scale, enable_gqa) -> bool:
    """True exactly where torch would run SDPA's math path with dropout and autograd would save its maps."""
    if not (0.0 < p < 1.0) or not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
        return False
    if enable_gqa or (scale is not None and scale < 0) or (is_causal and mask is not None):
        return False
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.dtype != q.dtype or t.dim() < 3
           for t in (q, k, v)) or q.shape[-3] != k.shape[-3]:
        return False
    return mask is None or (mask.device == q.device and not mask.requires_grad
                            and (mask.dtype == torch.bool or mask.dtype == q.dtype))


def _is_dropout_sdpa(mod: nn.Module) -> bool:
    """The mode pass's ``TrainOnlySDPA`` with p > 0."""
    p = getattr(mod, "p", None)
    return type(mod) is TrainOnlySDPA and isinstance(p, float) and p > 0


def lean_attention(gm: fx.GraphModule, recompute: bool = True, mask: str = "bool") -> PassResult:
    """A graph sharing ``gm``'s parameters whose dropout attention saves q, k, v and a mask (``gm`` untouched).

    ``modified=False`` (and ``gm`` itself) when ``gm`` has no attention with dropout.
    """
    if mask not in MASKS:
        raise LrcError(f"lean_attention: mask={mask!r} is not one of {', '.join(map(repr, MASKS))}")
    targets = {n.target for n in gm.graph.nodes
               if n.op == "call_module" and _is_dropout_sdpa(gm.get_submodule(n.target))}
    if not targets:
        return PassResult(gm, False)
    new = shared_copy(gm)
    for node in list(new.graph.nodes):
        if node.op == "call_module" and node.target in targets:
            inner = new.get_submodule(node.target)
            replace_with_module(new, node, fresh_name(new, "lrc_lean_attention"), LeanAttention(inner, recompute, mask),
                                node.args, dict(node.kwargs))
    for target in targets:
        if "." not in target:  # the mode pass adds them at the root; the copy drops its own reference only
            delete_submodule(new, target)
    return PassResult(finalize(new), True)
