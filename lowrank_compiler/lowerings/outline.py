"""Outline each numbered block of a flat lrc graph (``encoder.layer.3``, ``h.0``) into a called submodule.

A traced graph reads every weight with a ``get_attr`` of its root ``forward``, so the modules that own
them are never called and per-block module hooks (FSDP2's ``fully_shard`` unshard/reshard) never
fire. This lowering builds a new top GraphModule whose block nodes are replaced by one
``call_module`` per block; each block is a GraphModule that owns that block's weights and adapter
modules (the same tensor and module objects as the flat graph: nothing is copied). The flat graph
is left untouched, so lrc's passes, ``save`` and ``merge`` keep working on it.

A node belongs to block ``B`` when its ``get_attr`` / ``call_module`` target or the innermost
``nn_module_stack`` entry lies under ``B``; nodes between a block's first and last node belong to it
too (so each block is one contiguous range and the top graph stays acyclic). A weight read outside
its block (a tied weight) stays in the top graph.

:func:`borrow_units` runs the outline of *another* call signature's graph (``labels=``, no mask ...) through the
units of an outlined module: each of its units' code runs as the same-named unit (so hooks on that unit, such as
FSDP2's unshard/reshard and gradient reduce-scatter, fire and its weights are the ones read), and its top code runs
inside the top module's call. One set of units, one set of parameters, every signature.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Any

from torch import fx, nn

from lowrank_compiler.errors import LrcError
from lowrank_compiler.ir import lookup_attr
from lowrank_compiler.lowerings.blocks import block_of_path, node_block, numbered_blocks

PRE, POST = "lrc_pre", "lrc_post"


def _module(objects: dict[str, object], graph: fx.Graph, name: str) -> fx.GraphModule:
    root = nn.Module()
    for path, obj in objects.items():  # same objects under the same dotted paths
        _place(root, path, obj)
    return fx.GraphModule(root, graph, class_name=name)


def _place(root: nn.Module, path: str, obj: object) -> None:
    """Register ``obj`` (module, parameter or buffer) at dotted ``path`` under ``root``, making missing parents."""
    *parents, leaf = path.split(".")
    mod = root
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(obj, nn.Module):
        mod.add_module(leaf, obj)
    elif isinstance(obj, nn.Parameter):
        mod.register_parameter(leaf, obj)
    else:
        mod.register_buffer(leaf, obj)


def _objects(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[str, object]:
    return {str(n.target): gm.get_submodule(n.target) if n.op == "call_module" else lookup_attr(gm, str(n.target))
            for n in nodes if n.op in ("get_attr", "call_module")}


def outline_blocks(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """(top module calling one submodule per unit, ``{submodule name: what it holds}``). The top takes
    ``gm``'s inputs and returns its outputs. Units: ``lrc_block_<i>`` (block ``i``, e.g. ``encoder.layer.3``),
    ``lrc_pre`` (what runs before the first block: embeddings) and ``lrc_post`` (after the last: pooler,
    head); each holds its tensors and modules under their original paths.

    Raises:
        LrcError: ``gm`` has no numbered blocks, or a block's nodes interleave with another block's.
    """
    blocks = numbered_blocks(gm)
    if not blocks:
        raise LrcError("no numbered blocks (like encoder.layer.0) hold parameters in this graph; "
                       "per-block units need a model built from a ModuleList of layers")
    bset = set(blocks)
    nodes = list(gm.graph.nodes)
    key = {n: node_block(n, bset) for n in nodes if n.op not in ("placeholder", "output", "get_attr")}
    span: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        if key.get(n):
            span.setdefault(key[n], [i, i])[1] = i
    ranges = sorted((s, e, b) for b, (s, e) in span.items())
    for (_, e0, b0), (s1, _, b1) in zip(ranges, ranges[1:]):
        if s1 <= e0:
            raise LrcError(f"the nodes of {b0} and {b1} interleave in the graph; cannot outline them as blocks")
    units = {PRE: "nodes before the first block", **{f"lrc_block_{i}": b for i, (_, _, b) in enumerate(ranges)},
             POST: "nodes after the last block"}
    name_of = {b: f"lrc_block_{i}" for i, (_, _, b) in enumerate(ranges)}
    member: dict[fx.Node, str] = {}
    for i, n in enumerate(nodes):
        if n.op not in ("placeholder", "output", "get_attr"):
            member[n] = PRE if i < ranges[0][0] else POST if i > ranges[-1][1] else ""
    for s, e, b in ranges:
        for n in nodes[s:e + 1]:
            if n in member:
                member[n] = name_of[b]
    member = {n: u for n, u in member.items() if u}
    for n in nodes:  # a weight goes with its unit when only that unit reads it (a tied weight stays on top)
        if n.op == "get_attr":
            owners = {member.get(u) for u in n.users}
            unit = owners.pop() if len(owners) == 1 else None
            block = block_of_path(str(n.target), bset)
            if unit in (PRE, POST) or (unit is not None and name_of.get(block or "") == unit):
                member[n] = unit

    top = fx.Graph()
    top._codegen = gm.graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    subs: dict[str, fx.GraphModule] = {}
    last = {u: i for i, n in enumerate(nodes) if (u := member.get(n))}
    for i, n in enumerate(nodes):
        b = member.get(n)
        if b is None:
            env[n] = top.node_copy(n, lambda a: env[a])
            continue
        if i != last[b]:
            continue
        body = [m for m in nodes if member.get(m) == b]
        inside = set(body)
        inputs = list(dict.fromkeys(a for m in body for a in m.all_input_nodes if a not in inside))
        outputs = [m for m in body if any(u not in inside for u in m.users)]
        g = fx.Graph()
        local = {a: g.placeholder(a.name) for a in inputs}
        for m in body:
            local[m] = g.node_copy(m, local.__getitem__)
        g.output(tuple(local[m] for m in outputs))
        subs[b] = _module(_objects(gm, body), g, b)
        call = top.call_module(b, tuple(env[a] for a in inputs))
        for j, m in enumerate(outputs):
            env[m] = top.call_function(operator.getitem, (call, j))
            env[m].meta = dict(m.meta)
    objects = _objects(gm, [n for n in nodes if n not in member])
    out = _module({**objects, **subs}, top, "LrcBlocks")
    return out, {u: label for u, label in units.items() if u in subs}



def _put(root: nn.Module, path: str, obj: Any) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = obj
    elif leaf in owner._buffers:
        owner._buffers[leaf] = obj
    else:
        setattr(owner, leaf, obj)


def _targets(g: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in g.graph.nodes if n.op in ("get_attr", "call_module")]


@contextmanager
def _forwards(codes: dict[nn.Module, Any]) -> Iterator[None]:
    """Each module's ``forward`` replaced by the given callable for the duration (its hooks still fire)."""
    for mod, fn in codes.items():
        mod.__dict__["forward"] = fn
    try:
        yield
    finally:
        for mod in codes:
            mod.__dict__.pop("forward", None)


class Borrowed(nn.Module):
    """A variant's outline run through the units (and the call) of an outlined module: see :func:`borrow_units`."""

    def __init__(self, top: nn.Module, vtop: fx.GraphModule, bodies: dict[str, fx.GraphModule],
                 roots: list[str]) -> None:
        super().__init__()
        self.vtop = vtop  # its units are ``top``'s own
        self.__dict__.update(_top=top, _bodies=bodies, _roots=roots)

    def forward(self, *args: Any) -> Any:
        top, vtop = self._top, self.vtop

        def run(*a: Any) -> Any:  # inside top's call: its tensors as top holds them now (FSDP2: unsharded)
            saved = [(p, lookup_attr(vtop, p)) for p in self._roots]
            for p in self._roots:
                _put(vtop, p, lookup_attr(top, p))
            try:
                return vtop(*a)
            finally:
                for p, obj in saved:
                    _put(vtop, p, obj)

        units = {top.get_submodule(u): MethodType(type(b).forward, top.get_submodule(u)) for u, b in self._bodies.items()}
        with _forwards({top: run, **units}):
            return nn.Module.__call__(top, *args)


def borrow_units(top: fx.GraphModule, variant: fx.GraphModule) -> Borrowed:
    """``variant`` (a graph over the same tensors and modules as the graph ``top`` was outlined from, traced for
    another call signature) outlined, its units run as ``top``'s same-named units and its top code inside ``top``'s
    call. A tensor only the variant reads (a constant its trace lifted) is added to the unit or top that runs it.

    Raises:
        LrcError: the variant's blocks differ from ``top``'s, or a unit of it reads a tensor or module that the
            same-named unit of ``top`` holds as another object.
    """
    vtop, units = outline_blocks(variant)
    bodies: dict[str, fx.GraphModule] = {}
    for u in units:
        mine = top._modules.get(u)
        if mine is None:
            raise LrcError(f"the call's graph has a unit {u} ({units[u]}) that the outlined model lacks; "
                           f"it has {', '.join(n for n in top._modules if n.startswith('lrc_'))}")
        body = vtop.get_submodule(u)
        _share(mine, body, u)
        bodies[u] = body
        vtop._modules[u] = mine
    roots = [t for t in _targets(vtop) if t not in units and not isinstance(lookup_attr(vtop, t), nn.Module)]
    _share(top, vtop, "the top graph", roots)
    return Borrowed(top, vtop, bodies, roots)


def _share(owner: nn.Module, g: fx.GraphModule, where: str, targets: list[str] | None = None) -> None:
    for t in _targets(g) if targets is None else targets:
        have, want = lookup_attr(owner, t), lookup_attr(g, t)
        if have is None:
            _place(owner, t, want)
        elif have is not want:
            raise LrcError(f"{where} of the call's graph reads {t} as another object than the outlined model "
                           "holds; trace the model again (lrc.transform) before wrapping it")
