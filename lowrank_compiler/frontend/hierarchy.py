"""The module hierarchy that a transformed model's graphs share (``face.py``'s variant graphs).

A variant graph is exported from the original model; :func:`share_hierarchy` makes it run on the
primary graph's submodules (base weights, adapter modules), so every graph sees one set of tensors.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from lowrank_compiler.ir import lookup_attr

__all__ = ["lookup_attr", "share_hierarchy"]


def share_hierarchy(primary: fx.GraphModule, var: fx.GraphModule) -> None:
    """Make ``var`` use the primary's submodules, adding to them any tensor only ``var`` needs."""
    for node in var.graph.nodes:
        if node.op != "get_attr" or lookup_attr(primary, node.target) is not None:
            continue
        obj = lookup_attr(var, node.target)
        if isinstance(obj, nn.Parameter):
            obj.requires_grad_(False)
        *parents, leaf = node.target.split(".")
        mod: nn.Module = primary
        for part in parents:
            nxt = getattr(mod, part, None)
            if nxt is None:
                nxt = nn.Module()
                setattr(mod, part, nxt)
            mod = nxt
        if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
            mod.register_buffer(leaf, obj)
        else:
            setattr(mod, leaf, obj)
    for name in list(var._modules):
        mine = primary._modules.get(name)
        if mine is not None:
            setattr(var, name, mine)
