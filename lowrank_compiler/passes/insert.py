"""Rewrite: replace each marked linear with a call to its adapter, passing the base weight in."""

from __future__ import annotations

import torch
from torch import fx, nn

from lowrank_compiler.ir import META_KEY, AdapterMark, SiteMark, adapter_path, finalize, lrc_meta, replace_with_module
from lowrank_compiler.methods.base import AdapterMethod, get_method
from lowrank_compiler.passes.manager import PassResult
from lowrank_compiler.spec.sites import Site, find_sites

_aten = torch.ops.aten
_LINEAR_TARGETS = (_aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear)


def freeze_base(gm: fx.GraphModule) -> None:
    """Every parameter that is not inside an adapter (or a module a spec trains fully) stops requiring grad."""
    # any AdapterMethod in the hierarchy, not only those the graph calls yet: a variant graph (face.py)
    # shares the primary's adapters before its insert runs
    keep = {id(p) for mod in gm.modules() if isinstance(mod, AdapterMethod) for p in mod.parameters()}
    keep |= {id(p) for p in lrc_meta(gm).get("trainable_extra", ())}
    for p in gm.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def insert(gm: fx.GraphModule) -> PassResult:
    """Insert one adapter per SiteMark'ed node and freeze the base.

    Cases:
      1. ``aten.linear(x, W, b)`` / ``F.linear`` → ``adapter(x, W, b)``.
      2. ``addmm(b, x, W)`` / ``mm(x, W)`` (W stored d_in × d_out) → ``adapter(x, t(W), b)``;
         ``linear(x, t(W), b)`` (what merge/strip emit for such weights) keeps its ``t`` node.
      3. ``call_module`` nn.Linear / HF Conv1D → get_attr W, b + case 1 or 2; the module is
         replaced by a plain container holding W and b, so the user's module is not mutated.
    Nodes that are already adapters are not marked: ``modified=False``.
    """
    freeze_base(gm)
    modified = False
    marked = [(s, s.node.meta.get(META_KEY)) for s in find_sites(gm) if isinstance(s.node.meta.get(META_KEY), SiteMark)]
    group_shape: dict[tuple, tuple[int, int]] = {}  # (method, args) -> max (d_out, d_in) over its sites
    for site, mark in marked:
        o, i = group_shape.get((mark.method, mark.args), (0, 0))
        group_shape[(mark.method, mark.args)] = (max(o, site.d_out), max(i, site.d_in))
    for site, mark in marked:
        _try_rewrite(gm, site, mark, group_shape[(mark.method, mark.args)])
        modified = True
    if modified:
        finalize(gm)
    return PassResult(gm, modified)


def _try_rewrite(gm: fx.GraphModule, site: Site, mark: SiteMark,
                 group_shape: tuple[int, int] | None = None) -> bool:
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
    elif node.target in (_aten.addmm.default, torch.addmm):  # case 2
        b, x, w = node.args
    elif node.target not in _LINEAR_TARGETS:  # case 2, mm
        (x, w), b = node.args, None
    else:  # case 1 (also linear(x, t(W)), whose weight arg is already d_out x d_in)
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if site.layout == "conv1d" and not (isinstance(w, fx.Node) and w.op == "call_function"):
        with g.inserting_before(node):
            w = g.call_function(_aten.t.default, (w,))
    weight = gm.get_parameter(site.weight_path)
    path = adapter_path(gm, site.name)
    method = _existing(gm, path, mark.method)
    if method is None:
        info = site.info()
        info.extra["group_shape"] = group_shape or (site.d_out, site.d_in)  # max (d_out, d_in) over the sites sharing this method+args (VeRA)
        method = get_method(mark.method)(info, **dict(mark.args))
        method.to(device=weight.device)
        method.train(gm.training)  # a new module defaults to train mode; follow the graph's (dropout)
        method.init_from_base(weight.t() if site.layout == "conv1d" else weight)
    new = replace_with_module(gm, node, path, method, (x, w, b))
    new.meta[META_KEY] = AdapterMark(site.name, mark.method, site.layout, site.weight_path, site.bias_path, path)
    return True


def _existing(gm: fx.GraphModule, path: str, method: str) -> AdapterMethod | None:
    """The adapter already at ``path`` (another graph over the same hierarchy inserted it), reused as is."""
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return None
    return mod if isinstance(mod, AdapterMethod) and mod.name == method else None
