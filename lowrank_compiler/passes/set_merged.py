"""Set merged: fold adapters into (or out of) their base weights in place, keeping the adapters."""

from __future__ import annotations

import torch
from torch import fx

from lowrank_compiler.ir import adapter_sites, logical_weight, set_logical_weight
from lowrank_compiler.passes.manager import PassResult


def set_merged(gm: fx.GraphModule, merged: bool) -> PassResult:
    """Merge (``True``) or unmerge (``False``) every adapter in place, keeping the adapters.

    While merged, an adapter computes only the base linear with the folded weight.
    Adapters already in the requested state are left alone (``modified=False``).
    """
    modified = False
    with torch.no_grad():
        for _, mark, method in adapter_sites(gm):
            if method.merged == merged:
                continue
            w = logical_weight(gm, mark)
            set_logical_weight(gm, mark, method.merged_weight(w) if merged else method.unmerged_weight(w))
            method.merged = merged
            modified = True
    return PassResult(gm, modified)
