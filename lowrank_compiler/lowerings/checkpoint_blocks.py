"""Activation checkpointing per block: each encoder/decoder layer of the traced graph is recomputed in backward.

Blocks are found from the graph's module paths (``nn_module_stack``): the outermost module path ending in
an index (``encoder.layer.3``, ``model.layers.0``, ``h.11``) names a node's block. Each block's nodes (the
span from its first to its last node in graph order) become a sub-GraphModule called through
:class:`CheckpointedBlock`, which runs it under ``torch.utils.checkpoint`` (non-reentrant, RNG state
preserved: the dropout masks drawn in the recompute are the forward's, so gradients equal the
non-checkpointed graph's under the same seed). Forward then keeps only each block's inputs; backward
re-runs one block's forward at a time (≈ one extra forward per step).

This is a *lowering*: the result calls the same modules, parameters and buffers as ``gm`` (adapters are
owned by the block modules that call them); build the optimizer, save, merge and export from ``gm``,
run the training steps through the result. Without grad (inference) the blocks run directly.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from lowrank_compiler.ir import META_KEY, fresh_name, lookup_attr
from lowrank_compiler.lowerings.blocks import blocks
from lowrank_compiler.passes.manager import PassResult

_CALLS = ("call_function", "call_module", "call_method")


class CheckpointedBlock(nn.Module):
    """One block's sub-graph, recomputed in backward; returns the tuple of the block's outputs."""

    def __init__(self, block: fx.GraphModule, path: str) -> None:
        super().__init__()
        self.block = block
        self.path = path

    def forward(self, *args: Any) -> tuple[Any, ...]:
        if torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False, preserve_rng_state=True)
        return self.block(*args)

    def extra_repr(self) -> str:
        return f"block={self.path!r}"


def _extract(gm: fx.GraphModule, span: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """The span as a GraphModule over ``gm``'s objects: (module, input nodes, output nodes)."""
    inside = set(span)
    ext: dict[fx.Node, None] = {}
    for n in span:
        for a in n.all_input_nodes:
            if a not in inside:
                ext.setdefault(a)
    inputs = [a for a in ext if a.op != "get_attr"]
    outputs = [n for n in span if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for a in ext:
        if a.op == "get_attr":
            env[a] = sub.node_copy(a)
    for n in span:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    targets = {n.target for n in sub.nodes if n.op in ("get_attr", "call_module")}
    mod = fx.GraphModule({t: lookup_attr(gm, t) for t in targets}, sub)
    return mod, inputs, outputs


def checkpoint_blocks(gm: fx.GraphModule) -> PassResult:
    """A graph whose blocks are checkpointed, sharing ``gm``'s parameters (``gm`` untouched).

    ``modified=False`` (and ``gm`` itself) when the graph has no blocks.
    """
    if not blocks(gm.graph):
        return PassResult(gm, False)
    graph = copy.deepcopy(gm.graph)
    wrappers: dict[str, nn.Module] = {}
    for i, (path, span) in enumerate(blocks(graph)):
        mod, inputs, outputs = _extract(gm, span)
        name = fresh_name(gm, f"lrc_block_{i}")
        wrappers[name] = CheckpointedBlock(mod, path)
        with graph.inserting_before(span[0]):
            call = graph.call_module(name, tuple(inputs))
            call.meta["lrc_block"] = path
            outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
        for o, new in zip(outputs, outs):
            new.meta = {k: v for k, v in o.meta.items() if k != META_KEY}
            o.replace_all_uses_with(new)
        for n in reversed(span):
            graph.erase_node(n)
    for n in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:  # now read inside a block only
        graph.erase_node(n)
    graph.lint()
    root = {n.target: wrappers[n.target] if n.target in wrappers else lookup_attr(gm, n.target)
            for n in graph.nodes if n.op in ("get_attr", "call_module")}
    new = fx.GraphModule(root, graph)
    new.meta = dict(gm.meta)
    new.train(gm.training)
    return PassResult(new, True)
