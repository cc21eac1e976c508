"""Graph surgery kept in one place: fresh names, module insertion, the pass result/manager."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

META_KEY = "lrc"


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly same) GraphModule and whether it changed."""

    gm: fx.GraphModule
    modified: bool


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, drop dead code and recompile; every pass ends here."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def run_passes(gm: fx.GraphModule, passes: Sequence[tuple[str, Callable[..., PassResult]]]) -> PassResult:
    """Run passes in order; a failure re-raises naming the pass and the ones before it."""
    modified, done = False, []
    for name, fn in passes:
        try:
            res = fn(gm)
        except Exception as e:
            before = ", ".join(done) or "none"
            try:
                new = type(e)(f"pass {name!r} failed (after: {before}): {e}")
            except Exception:  # noqa: BLE001 - exception type without a 1-arg constructor
                raise e from None
            raise new from e
        gm, modified = res.gm, modified or res.modified
        done.append(name)
    return PassResult(gm, modified)


def lrc_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The GraphModule-level lrc metadata dict (created on first use)."""
    return gm.meta.setdefault(META_KEY, {})


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
    """Surgery idiom: add ``module`` at ``path``, call it in place of ``node``, erase ``node``."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, args, kwargs or {})
    new.meta.update({k: v for k, v in node.meta.items() if k != META_KEY})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
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
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part, None)
                return obj if isinstance(obj, torch.Tensor) else None
    return None
