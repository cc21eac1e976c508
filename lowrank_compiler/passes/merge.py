"""Merge: fold every adapter into its base weight and remove it."""

from __future__ import annotations

import torch
from torch import fx

from lowrank_compiler.ir import (
    META_KEY,
    AdapterMark,
    adapter_nodes,
    adapter_to_linear,
    delete_submodule,
    finalize,
    logical_weight,
    set_logical_weight,
)
from lowrank_compiler.methods.base import AdapterMethod
from lowrank_compiler.passes.manager import PassResult

_aten = torch.ops.aten


def merge(gm: fx.GraphModule) -> PassResult:
    """Fold every adapter into its base weight and remove it (mutates ``gm``).

    Cases:
      1. adapter node → ``aten.linear(x, W + ΔW, b)``; the adapter submodule is deleted.
    A graph without adapter nodes is already merged: ``modified=False``.
    Invariant afterwards: no adapter submodule remains.
    """
    nodes = adapter_nodes(gm)
    with torch.no_grad():
        for node in nodes:
            mark: AdapterMark = node.meta[META_KEY]
            method: AdapterMethod = gm.get_submodule(mark.module_path)
            if not method.merged:
                set_logical_weight(gm, mark, method.merged_weight(logical_weight(gm, mark)))
            adapter_to_linear(gm.graph, node)
            delete_submodule(gm, mark.module_path)
    if nodes:
        finalize(gm)
    return PassResult(gm, bool(nodes))
