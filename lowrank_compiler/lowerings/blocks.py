"""The numbered blocks of a graph (``encoder.layer.3``, ``model.layers.0``): the one home of block finding.

Two views, for two lowerings:
- by the module stack of each call (:func:`block_of`, :func:`blocks`): which nodes a block's forward produced,
  as contiguous spans (``checkpoint_blocks`` recomputes each span in backward);
- by parameter names (:func:`numbered_blocks`, :func:`node_block`): which tensors and modules a block owns
  (``outline`` makes each block one called submodule, an FSDP2 unit).
"""

from __future__ import annotations

import re

from torch import fx

_CALLS = ("call_function", "call_module", "call_method")
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(node: fx.Node) -> str | None:
    """The outermost module path ending in an index among the modules that produced ``node``."""
    for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
        if path.rpartition(".")[2].isdigit():
            return path
    return None


def blocks(graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """(path, nodes) of each block, in graph order; a block whose span holds another block's nodes is skipped."""
    nodes = list(graph.nodes)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        b = block_of(n) if n.op in _CALLS else None
        if b is not None:
            first.setdefault(b, i)
            last[b] = i
    out = []
    for b, i in first.items():
        span = [n for n in nodes[i:last[b] + 1] if n.op in _CALLS]
        if all(block_of(n) in (b, None) for n in span):
            out.append((b, span))
    return out


def block_of_path(path: str, blocks: set[str]) -> str | None:
    for cand in (path, path.partition(".")[2]):  # export may prefix the stack with its wrapper ("m.")
        m = _BLOCK.match(cand)
        if m and m.group(1) in blocks:
            return m.group(1)
    return None


def node_block(node: fx.Node, blocks: set[str]) -> str | None:
    if node.op in ("get_attr", "call_module"):
        return block_of_path(str(node.target), blocks)
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        found = block_of_path(str(path), blocks)
        if found:
            return found
    return None


def numbered_blocks(gm: fx.GraphModule) -> list[str]:
    """Paths like ``encoder.layer.3`` under which ``gm`` holds parameters (shallowest numbered prefix)."""
    out: dict[str, None] = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        m = _BLOCK.match(name)
        if m:
            out.setdefault(m.group(1), None)
    return list(out)
