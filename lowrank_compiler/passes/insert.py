"""Rewrite: replace each marked linear with a call to its adapter, passing the base weight in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..graph_utils import META_KEY, PassResult, finalize, replace_with_module
from ..methods.base import get_method
from ..sites import Site, find_sites
from .match import SiteMark

_aten = torch.ops.aten
ADAPTER_ATTR = "adapter"


@dataclass(frozen=True)
class AdapterMark:
    """Carried by every adapter call_module node (invariant: adapter nodes have ``meta['lrc']``)."""

    site: str
    method: str
    layout: str
    weight_path: str
    bias_path: str | None
    module_path: str

    def __post_init__(self) -> None:
        if self.layout not in ("linear", "conv1d"):
            raise ValueError(f"bad layout {self.layout!r}")


def freeze_base(gm: fx.GraphModule) -> None:
    """Every parameter that is not inside an adapter stops requiring grad."""
    for name, p in gm.named_parameters():
        if f".{ADAPTER_ATTR}." not in f".{name}":
            p.requires_grad_(False)


def insert(gm: fx.GraphModule) -> PassResult:
    """Insert one adapter per SiteMark'ed node and freeze the base.

    Cases:
      1. ``aten.linear(x, W, b)`` / ``F.linear`` → ``adapter(x, W, b)``.
      2. ``addmm(b, x, W)`` / ``mm(x, W)`` (W stored d_in × d_out) → ``adapter(x, t(W), b)``.
      3. ``call_module`` nn.Linear / HF Conv1D → get_attr W, b + case 1 or 2; the module is
         replaced by a plain container holding W and b, so the user's module is not mutated.
    Nodes that are already adapters are not marked: ``modified=False``.
    """
    freeze_base(gm)
    modified = False
    for site in find_sites(gm):
        mark = site.node.meta.get(META_KEY)
        if isinstance(mark, SiteMark):
            _try_rewrite(gm, site, mark)
            modified = True
    if modified:
        finalize(gm)
    return PassResult(gm, modified)


def _try_rewrite(gm: fx.GraphModule, site: Site, mark: SiteMark) -> bool:
    node, g = site.node, gm.graph
    if site.kind == "module":  # case 3
        old = gm.get_submodule(site.name)
        container = nn.Module()
        container.weight = old.weight
        if site.bias_path:
            container.bias = old.bias
        parent, _, leaf = site.name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, container)
        x = node.args[0]
        with g.inserting_before(node):
            w = g.get_attr(site.weight_path)
            b = g.get_attr(site.bias_path) if site.bias_path else None
    elif site.layout == "linear":  # case 1
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    else:  # case 2
        if node.target in (_aten.addmm.default, torch.addmm):
            b, x, w = node.args
        else:
            (x, w), b = node.args, None
    if site.layout == "conv1d":
        with g.inserting_before(node):
            w = g.call_function(_aten.t.default, (w,))
    weight = gm.get_parameter(site.weight_path)
    info = site.info()
    method = get_method(mark.method)(info, **dict(mark.args))
    method.to(device=weight.device)
    method.train(gm.training)  # a new nn.Module starts in training mode; follow the graph's mode
    path = f"{site.name}.{ADAPTER_ATTR}"
    new = replace_with_module(gm, node, path, method, (x, w, b))
    new.meta[META_KEY] = AdapterMark(site.name, mark.method, site.layout, site.weight_path, site.bias_path, path)
    return True


def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The adapter call_module nodes, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(n.meta.get(META_KEY), AdapterMark)]
