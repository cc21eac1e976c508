"""Strip: a base-only view of a transformed graph (adapters removed, weights NOT folded)."""

from __future__ import annotations

import copy

import torch
from torch import fx

from lowrank_compiler.ir import META_KEY, AdapterMark, adapter_to_linear, finalize
from lowrank_compiler.passes.manager import PassResult

_aten = torch.ops.aten


def strip(gm: fx.GraphModule) -> PassResult:
    """A new GraphModule over the same parameters with every adapter call replaced by its base linear.

    Cases:
      1. adapter node ``adapter(x, W, b)`` → ``aten.linear(x, W, b)``.
    ``gm`` itself is not changed. Without adapter nodes the copy is returned with ``modified=False``.
    """
    graph = copy.deepcopy(gm.graph)
    modified = False
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(node.meta.get(META_KEY), AdapterMark):
            adapter_to_linear(graph, node)
            modified = True
    out = fx.GraphModule(gm, graph)
    out.meta.update(copy.copy(gm.meta))
    out.train(gm.training)
    return PassResult(finalize(out), modified)
