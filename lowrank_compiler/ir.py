"""The IR's vocabulary: what every pass, backend and the training pass share about a GraphModule.

A transformed model is a ``torch.fx.GraphModule``. lrc's facts about it live in two places:
``node.meta["lrc"]`` (a :class:`SiteMark` on a linear the spec adapts, an :class:`AdapterMark` on an
adapter call) and ``gm.meta["lrc"]`` (graph-level records: example inputs, input names, specs).
Everything that reads or writes those facts goes through this module, and :func:`verify` checks
the invariants of docs/INVARIANTS.md in code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import LrcError
from .methods.base import AdapterMethod, get_method

META_KEY = "lrc"
ADAPTER_ATTR = "adapter"
#: where inactive named adapters live (``<NAMED_ROOT>.<name>.<site key>``, see named.py); verify skips them
NAMED_ROOT = "lrc_adapters"
_aten = torch.ops.aten


class VerifyError(LrcError, AssertionError):
    """A graph broke one of the IR invariants (a bug in a pass, or a graph edited by hand)."""


# -- marks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteMark:
    """On a linear node the spec adapts: which rule matched and what to insert."""

    site: str
    rule: int
    method: str
    args: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        if not self.site or self.rule < 0:
            raise ValueError(f"bad SiteMark {self!r}")
        get_method(self.method)


@dataclass(frozen=True)
class AdapterMark:
    """On every adapter call_module node: the site it adapts and where its tensors live."""

    site: str
    method: str
    layout: str
    weight_path: str
    bias_path: str | None
    module_path: str

    def __post_init__(self) -> None:
        if self.layout not in ("linear", "conv1d"):
            raise ValueError(f"bad layout {self.layout!r}")


# -- graph-level metadata --------------------------------------------------------------------------
def lrc_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The GraphModule-level lrc metadata dict (created on first use)."""
    return gm.meta.setdefault(META_KEY, {})


def example_inputs(gm: fx.GraphModule) -> tuple[tuple[Any, ...], list[str]]:
    """(example inputs, input names) recorded at trace time; both empty when none were given."""
    meta = lrc_meta(gm)
    inputs = tuple(meta.get("example_inputs") or ())
    names = list(meta.get("input_names") or [f"input_{i}" for i in range(len(inputs))])
    return inputs, names


# -- adapters --------------------------------------------------------------------------------------
def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The adapter call_module nodes, in graph order (the only way code finds adapters)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(n.meta.get(META_KEY), AdapterMark)]


def adapter_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, AdapterMark, AdapterMethod]]:
    """``(node, mark, adapter module)`` for every adapter, in graph order."""
    out = []
    for n in adapter_nodes(gm):
        mark: AdapterMark = n.meta[META_KEY]
        out.append((n, mark, gm.get_submodule(mark.module_path)))
    return out


def adapters_of(gm: fx.GraphModule) -> dict[str, AdapterMethod]:
    """``{site: adapter module}`` in graph order."""
    return {mark.site: mod for _, mark, mod in adapter_sites(gm)}


def adapter_path(gm: fx.GraphModule, site: str) -> str:
    """Where a site's adapter lives: ``<site>.adapter``, or ``<site>_adapter`` when the site is a bare parameter."""
    try:
        gm.get_submodule(site)
        return f"{site}.{ADAPTER_ATTR}"
    except AttributeError:
        return f"{site}_{ADAPTER_ATTR}"


# -- base weights ----------------------------------------------------------------------------------
def logical_weight(gm: fx.GraphModule, mark: AdapterMark) -> torch.Tensor:
    """The site's base weight in d_out × d_in layout (a view for Conv1D-layout weights)."""
    w = gm.get_parameter(mark.weight_path)
    return w.t() if mark.layout == "conv1d" else w


def set_logical_weight(gm: fx.GraphModule, mark: AdapterMark, value: torch.Tensor) -> None:
    """Replace the site's base weight by ``value`` (d_out × d_in) as a NEW parameter object.

    The old tensor may be shared with the user's original model, so it is never written in place.
    """
    old = gm.get_parameter(mark.weight_path)
    stored = value.t() if mark.layout == "conv1d" else value
    new = nn.Parameter(stored.detach().to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    parent, _, leaf = mark.weight_path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


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


class TrainOnlySDPA(nn.Module):
    """scaled_dot_product_attention whose attention dropout applies only in training mode.

    Inserted by ``passes/mode.py``; the lowerings that rewrite attention (``lean_attention``,
    ``lower_dropout``) recognise it by type.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        p = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )

    def extra_repr(self) -> str:
        return f"p={self.p}"


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
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part, None)
                return obj if isinstance(obj, torch.Tensor) else None
    return None


# -- invariants ------------------------------------------------------------------------------------
def verify(gm: fx.GraphModule) -> None:
    """Check the invariants of docs/INVARIANTS.md; raise :class:`VerifyError` naming the first broken one.

    1. the graph lints and its code is current; 2. every AdapterMark node calls an AdapterMethod
    and every AdapterMethod submodule is called by an AdapterMark node; 3. adapter nodes take
    ``(x, W, b)`` with W a d_out × d_in view of the marked weight parameter; 6. adapter nodes
    keep their ``meta['val']`` when the graph has them; 8. no ``aten.dropout`` node;
    9. outside adapters (and modules a spec made trainable), no parameter requires grad.
    """
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - re-raised as the invariant it breaks
        raise VerifyError(f"invariant 1 (lint-clean): {e}") from None
    if getattr(gm, "_code", None) is not None and gm.code != gm.graph.python_code("self").src:
        raise VerifyError("invariant 1 (recompiled): the graph changed after the last recompile()")
    called: set[str] = set()
    has_val = any("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    for node in gm.graph.nodes:
        mark = node.meta.get(META_KEY)
        if node.op == "call_function" and node.target is _aten.dropout.default:
            raise VerifyError(f"invariant 8 (mode): node {node.name} is a baked-in aten.dropout")
        if not isinstance(mark, AdapterMark):
            continue
        if node.op != "call_module":
            raise VerifyError(f"invariant 2 (marks): node {node.name} carries an AdapterMark but is {node.op}")
        try:
            mod = gm.get_submodule(node.target)
        except AttributeError:
            raise VerifyError(f"invariant 2 (marks): node {node.name} calls missing module {node.target}") from None
        if not isinstance(mod, AdapterMethod) or node.target != mark.module_path:
            raise VerifyError(f"invariant 2 (marks): node {node.name} ({mark.site}) does not call an AdapterMethod "
                              f"at {mark.module_path}")
        called.add(node.target)
        _verify_weight_arg(gm, node, mark)
        if has_val and "val" not in node.meta:
            raise VerifyError(f"invariant 6 (meta): adapter node {node.name} ({mark.site}) lost meta['val']")
    # adapters held by a called module (the members of a mixed-batch adapter) or stored inactive count as owned
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # ... and so does an adapter that a called module holds under another path too (a lowering's kernel module)
    held = {id(m) for t in targets if t not in called for m in gm.get_submodule(t).modules()}
    owned = [name for name, mod in gm.named_modules() if isinstance(mod, AdapterMethod) and name not in called
             and (name.startswith(NAMED_ROOT + ".") or any(name.startswith(t + ".") for t in targets)
                  or id(mod) in held)]
    for name, mod in gm.named_modules():
        if isinstance(mod, AdapterMethod) and name not in called and name not in owned:
            raise VerifyError(f"invariant 2 (marks): adapter module {name} is not called by any marked node")
    if called or owned:
        keep = {id(p) for name in [*called, *owned] for p in gm.get_submodule(name).parameters()}
        keep |= {id(p) for p in lrc_meta(gm).get("trainable_extra", ())}
        loose = [n for n, p in gm.named_parameters() if p.requires_grad and id(p) not in keep]
        if loose:
            raise VerifyError(f"invariant 9 (frozen base): base parameters require grad: {loose[:3]}")


def _verify_weight_arg(gm: fx.GraphModule, node: fx.Node, mark: AdapterMark) -> None:
    if len(node.args) != 3:
        raise VerifyError(f"invariant 3 (weight in): adapter node {node.name} takes {len(node.args)} args, not (x, W, b)")
    w = node.args[1]
    if mark.layout == "conv1d" and isinstance(w, fx.Node) and w.op == "call_function" and w.target is _aten.t.default:
        w = w.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target == mark.weight_path):
        raise VerifyError(f"invariant 3 (weight in): adapter node {node.name} ({mark.site}) does not receive "
                          f"its base weight {mark.weight_path} as W")
    if not isinstance(get_attr_tensor(gm, w), nn.Parameter):
        raise VerifyError(f"invariant 3 (weight in): {mark.weight_path} is not a parameter of the graph")
    mod = gm.get_submodule(mark.module_path)
    shape = tuple(logical_weight(gm, mark).shape)
    if shape != (mod.d_out, mod.d_in):
        raise VerifyError(f"invariant 3 (weight in): {mark.site}: W is {shape}, adapter expects "
                          f"({mod.d_out}, {mod.d_in})")
