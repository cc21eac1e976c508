"""Fold adapters into the base weights (``merge``), or toggle them in place (``set_merged``)."""

from __future__ import annotations

import torch
from torch import fx

from ..ir import META_KEY, AdapterMark, adapter_nodes, delete_submodule, finalize, logical_weight, set_logical_weight
from ..methods.base import AdapterMethod
from .manager import PassResult

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
            x, w, b = node.args
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(_aten.linear.default, (x, w, b) if b is not None else (x, w))
            new.meta.update({k: v for k, v in node.meta.items() if k != META_KEY})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            delete_submodule(gm, mark.module_path)
    if nodes:
        finalize(gm)
    return PassResult(gm, bool(nodes))


def set_merged(gm: fx.GraphModule, merged: bool) -> PassResult:
    """Merge (``True``) or unmerge (``False``) every adapter in place, keeping the adapters.

    While merged, an adapter computes only the base linear with the folded weight.
    Adapters already in the requested state are left alone (``modified=False``).
    """
    modified = False
    with torch.no_grad():
        for node in adapter_nodes(gm):
            mark: AdapterMark = node.meta[META_KEY]
            method: AdapterMethod = gm.get_submodule(mark.module_path)
            if method.merged == merged:
                continue
            w = logical_weight(gm, mark)
            set_logical_weight(gm, mark, method.merged_weight(w) if merged else method.unmerged_weight(w))
            method.merged = merged
            modified = True
    return PassResult(gm, modified)
