"""Lowering: the graph's own linears (the layers no adapter sits on: FFN, pooler) → oneDNN GEMMs.

``aten.linear(x, W, b)`` → ``kernels.linear(x, W, b)``: the same function, whose forward GEMM and
∂x GEMM run through oneDNN for fp32 CPU tensors (12–19 % faster than MKL's sgemm on the AMD EPYC this
was measured on, docs/speed.md) and fall back to ``F.linear`` for anything else. ∂W and ∂b are computed
only when W / b require grad, so a frozen base pays for ∂x alone (as autograd's ``addmm`` does).
Run on a copy that shares the parameters (``backends/torch_compile.lower``); ``modified=False`` when the
graph has no ``aten.linear`` node.
"""

from __future__ import annotations

import torch
from torch import fx

from lowrank_compiler.ir import finalize
from lowrank_compiler.lowerings.kernels import linear
from lowrank_compiler.passes.manager import PassResult

_aten = torch.ops.aten


def lower_linear(gm: fx.GraphModule) -> PassResult:
    """Every ``aten.linear.default`` call → :func:`kernels.linear` (in place)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _aten.linear.default:
            node.target = linear
            n += 1
    if n:
        finalize(gm)
    return PassResult(gm, bool(n))
