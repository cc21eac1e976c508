"""Graph surgery shared by passes and lowerings: finalize, fresh names, module replacement, shared copies."""


import copy
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.ir.marks import META_KEY, _aten


# -- surgery ---------------------------------------------------------------------------------------
def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, drop dead code and recompile; every pass that rewrites ends here."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def fresh_name(gm: nn.Module, base: str) -> str:
    """An attribute path under ``gm`` that is not taken yet, derived from ``base``."""
    name, i = base, 0
    while _exists(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _exists(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        pass
    try:
        gm.get_parameter(path)
        return True
    except AttributeError:
        return False


def replace_with_module(
    gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module,
    args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
) -> fx.Node:
    """Add ``module`` at ``path``, call it in place of ``node``, erase ``node`` (meta is inherited)."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, args, kwargs or {})
    new.meta.update({k: v for k, v in node.meta.items() if k != META_KEY})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph that shares all of ``gm``'s submodules and tensors.

    The base of every *lowering* (a graph for running steps whose parameters stay owned by ``gm``):
    node meta (marks, module stacks) and the pytree calling convention are copied with the graph.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for name, child in gm.named_children():
        setattr(new, name, child)
    for name, p in gm._parameters.items():
        new._parameters[name] = p
    for name, b in gm._buffers.items():
        new._buffers[name] = b
    new.meta = dict(gm.meta)
    new.train(gm.training)
    return new


def frozen_shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (its own graph and submodules) that shares ``gm``'s frozen tensors (``requires_grad``
    False: the base weights), for a pass that never writes one in place (a rewritten base weight is a new tensor:
    ``set_logical_weight``). Separating or merging a 1.1B model's copy then costs its adapters, not +1 W."""
    return copy.deepcopy(gm, {id(t): t for t in [*gm.parameters(), *gm.buffers()] if not t.requires_grad})


def adapter_to_linear(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Replace the adapter node ``adapter(x, W, b)`` by ``aten.linear(x, W, b)``; returns the new node.

    The adapter submodule itself is left in place (the caller decides whether to delete it).
    """
    x, w, b = node.args
    with graph.inserting_after(node):
        new = graph.call_function(_aten.linear.default, (x, w, b) if b is not None else (x, w))
    new.meta.update({k: v for k, v in node.meta.items() if k != META_KEY})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def delete_submodule(gm: fx.GraphModule, path: str) -> None:
    """Remove the submodule at ``path`` (and nothing else)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    delattr(parent, leaf)


def get_attr_tensor(gm: nn.Module, node: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for anything else."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            return gm.get_parameter(node.target)
        except AttributeError:
            try:
                return gm.get_buffer(node.target)
            except AttributeError:
                obj = lookup_attr(gm, node.target)
                return obj if isinstance(obj, torch.Tensor) else None
    return None


def lookup_attr(root: nn.Module, path: str) -> Any:
    """The object at dotted ``path`` under ``root``, or None: the one dotted-path getter of the package."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
