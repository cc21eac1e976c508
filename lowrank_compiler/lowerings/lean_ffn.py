"""GELU after a frozen linear keeps the linear's input, not its 4×-wider output, and recomputes the linear.

In a transformer FFN ``gelu(x Wᵀ + b)`` with W frozen, autograd keeps only the GELU input u = x Wᵀ + b
(B, T, d_ff) for backward: the linear needs no input because W gets no gradient. :func:`gelu_linear`
keeps x (B, T, d) instead and recomputes u in backward with the same ``aten.linear`` call: one extra
(N × d)·(d × d_ff) GEMM per layer buys d_ff/d = 4× less kept memory for this activation (MiniLM 16×128:
12 MiB → 3 MiB per layer). A partial checkpoint: a third of a BERT layer's GEMM FLOPs instead of all.
Outputs and gradients are bitwise the unrewritten graph's (same kernels: ``aten.linear``,
``aten.gelu_backward`` and the ``mm`` autograd uses for ∂x). Off by default in ``lrc.lower_memory``
(``ffn=True``) because it costs time; the rewrites in :mod:`.lean_attention` and :mod:`.lean_dropout` do not
add GEMMs to the forward and cost less.

This is a *lowering* like the others: a new graph sharing every module and tensor with ``gm``.
"""

from __future__ import annotations

import torch
from torch import fx

from lowrank_compiler.ir import finalize, get_attr_tensor, shared_copy
from lowrank_compiler.passes.manager import PassResult

_aten = torch.ops.aten


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.approximate = approximate
        ctx.save_for_backward(x, w, b)
        return _aten.gelu.default(_aten.linear.default(x, w, b), approximate=approximate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, b = ctx.saved_tensors
        u = _aten.linear.default(x, w, b)
        gu = _aten.gelu_backward.default(grad, u, approximate=ctx.approximate)
        return gu.reshape(-1, gu.shape[-1]).mm(w).view(x.shape), None, None, None


def gelu_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                approximate: str = "none") -> torch.Tensor:
    """``gelu(linear(x, w, b))``; with grad for x only, keeps x (not the linear's output) for backward."""
    if (torch.is_grad_enabled() and x.requires_grad and not w.requires_grad and b is not None
            and not b.requires_grad and x.dim() in (2, 3) and x.is_contiguous() and x.is_floating_point()):
        return _GeluLinear.apply(x, w, b, approximate)
    return _aten.gelu.default(_aten.linear.default(x, w, b), approximate=approximate)


def _pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(linear, gelu) nodes where the gelu is the only user of a linear over frozen get_attr weights."""
    out = []
    for g in gm.graph.nodes:
        if g.op != "call_function" or g.target is not _aten.gelu.default or not isinstance(g.args[0], fx.Node):
            continue
        lin = g.args[0]
        if lin.op != "call_function" or lin.target is not _aten.linear.default or len(lin.users) != 1:
            continue
        params = [get_attr_tensor(gm, a) for a in lin.args[1:3]]
        if len(params) == 2 and all(p is not None and not p.requires_grad for p in params):
            out.append((lin, g))
    return out


def lean_ffn(gm: fx.GraphModule) -> PassResult:
    """A graph sharing ``gm``'s parameters whose gelu(frozen linear) keeps the linear's input (``gm`` untouched).

    ``modified=False`` (and ``gm`` itself) when no GELU follows a frozen biased linear.
    """
    if not _pairs(gm):
        return PassResult(gm, False)
    new = shared_copy(gm)
    for lin, g in _pairs(new):
        approximate = g.kwargs.get("approximate", g.args[1] if len(g.args) > 1 else "none")
        with new.graph.inserting_after(g):
            fused = new.graph.call_function(gelu_linear, (*lin.args, approximate))
        fused.meta = dict(g.meta)
        g.replace_all_uses_with(fused)
        new.graph.erase_node(g)
        new.graph.erase_node(lin)
    return PassResult(finalize(new), True)
