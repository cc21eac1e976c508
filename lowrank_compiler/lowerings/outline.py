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
"""

from __future__ import annotations

import operator

from torch import fx, nn

from lowrank_compiler.errors import LrcError
from lowrank_compiler.ir import lookup_attr
from lowrank_compiler.lowerings.blocks import block_of_path, node_block, numbered_blocks

PRE, POST = "lrc_pre", "lrc_post"


def _module(objects: dict[str, object], graph: fx.Graph, name: str) -> fx.GraphModule:
    root = nn.Module()
    for path, obj in objects.items():  # same objects under the same dotted paths
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
    return fx.GraphModule(root, graph, class_name=name)


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

