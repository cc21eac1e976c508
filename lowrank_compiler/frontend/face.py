"""The transformed model keeps the original's face: every call it accepted, and what users reach for.

One module hierarchy (base weights + adapter modules), many graphs. A traced graph accepts exactly
the inputs it was traced with, so :class:`Face` (the dispatcher of
:class:`~lowrank_compiler.frontend.module.LrcGraphModule`) normalises each call against the original
model's ``forward`` signature into a *signature key* (which inputs are present, their dtypes and
ranks, the non-tensor values), as ``torch.compile`` guards and recompiles:

- the key the primary graph was traced with runs the primary graph (the one passes rewrite);
- any other key is exported once from the original model (kept by reference), its tensors resolved
  against the primary hierarchy, and rewritten with the primary's adapter records, REUSING the
  primary's adapter modules; so training, merging and LoRA-GA base offsets are seen by every graph.

Variants are dropped when the primary graph is recompiled (a pass rewrote it). ``generate`` runs
the original model's ``GenerationMixin.generate`` with its forward routed through this dispatcher;
the KV-cache decode step is just another signature.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from lowrank_compiler.errors import TraceError
from lowrank_compiler.frontend.capture import export_call
from lowrank_compiler.frontend.hierarchy import share_hierarchy
from lowrank_compiler.ir import adapter_sites, lrc_meta, verify
from lowrank_compiler.passes.manager import verification, verify_enabled
from lowrank_compiler.passes.pipelines import apply_records

_MISSING = object()
_SIMPLE = (bool, int, float, str, type(None))

_T = "T"


def _desc(leaf: Any) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return (_T, leaf.dtype, leaf.dim(), leaf.device.type)
    if isinstance(leaf, _SIMPLE):
        return ("V", type(leaf).__name__, leaf)
    return ("O", type(leaf).__name__, id(leaf))


def _has_tensor(v: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(v)[0])


def _guards(gm: fx.GraphModule, n_leaves: int) -> list[tuple[int, int, int]] | None:
    """(leaf, dim, size) for every input dim the graph specialised; None when placeholders lack shapes."""
    out = []
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != n_leaves:
        return None
    for i, ph in enumerate(phs):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        out += [(i, d, int(s)) for d, s in enumerate(val.shape) if isinstance(s, int)]
    return out


class _Entry:
    """One graph and the calls it serves: input names (graph order) and its specialised dims."""

    def __init__(self, names: list[str], guards: list[tuple[int, int, int]] | None, gm: nn.Module | None):
        self.names, self.guards, self.gm = names, guards, gm

    def fits(self, leaves: list[Any]) -> bool:
        if self.guards is None:
            return True
        try:
            return all(leaves[i].shape[d] == s for i, d, s in self.guards)
        except (IndexError, AttributeError):
            return False


class Face:
    """The dispatcher: the original model, its signature, the primary's key, and traced variants."""

    def __init__(self, model: nn.Module, signature: inspect.Signature) -> None:
        self.model = model
        self.signature = signature
        self.primary_key: tuple | None = None
        self.primary: _Entry | None = None
        self.variants: dict[tuple, list[_Entry]] = {}
        self.stamp: Any = None
        # a derived face (a lowering of another graph): its variants are the parent's, rewritten by ``post``
        self.parent: tuple[Face, fx.GraphModule] | None = None
        self.post: Callable[[fx.GraphModule], fx.GraphModule] | None = None
        self.derived: dict[int, tuple[fx.GraphModule, nn.Module]] = {}
        self.run_primary: nn.Module | None = None  # runs the primary graph instead of the module (compiled)

    def __deepcopy__(self, memo: dict[int, Any]) -> Face:
        """A face for the copy of the graph being deep-copied: the original model is shared (never copied); a derived
        face copies its parent graph with the same ``memo``, so the copy's new signatures are lowered (compiled) from
        graphs over the copy's own parameters, never the original's."""
        new = Face(self.model, self.signature)
        new.primary_key, new.primary = self.primary_key, copy.copy(self.primary)
        if self.parent is not None:
            new.parent, new.post = copy.deepcopy(self.parent, memo), self.post
            run = self.run_primary  # torch.compile's module: compile the copy of the graph it wraps again
            orig = getattr(run, "_orig_mod", None)
            new.run_primary = (self.post(copy.deepcopy(orig, memo)) if orig is not None and self.post is not None
                               else copy.deepcopy(run, memo))
        return new

    def derive_face(self, parent_gm: fx.GraphModule, post: Callable[[fx.GraphModule], nn.Module],
                run_primary: nn.Module | None = None) -> Face:
        """The face of a graph made by ``post`` from ``parent_gm`` (sharing its parameters): every call ``parent_gm``
        serves, each other signature's graph taken from ``parent_gm`` and rewritten by ``post``; ``run_primary`` (e.g.
        the compiled primary graph) runs the primary signature instead of the graph itself."""
        new = Face(self.model, self.signature)
        new.primary_key, new.primary = self.primary_key, copy.copy(self.primary)
        new.parent, new.post, new.run_primary = (self, parent_gm), post, run_primary
        return new

    def adapter_root(self, gm: fx.GraphModule) -> tuple[Face, fx.GraphModule]:
        """``(face, graph)`` whose graphs call the adapter modules: ``gm``'s own, or for a lowering whose kernels
        read the adapters' tensors directly (no adapter call left to route per row), the graph it was derived from."""
        face = self
        while face.parent is not None and not adapter_sites(gm):
            face, gm = face.parent
        return face, gm

    # -- normalising a call --------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``{name: value}`` of the call, in signature order, without values equal to their default."""
        try:
            ba = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.model).__name__}.forward{self.signature}: {e}") from None
        out: dict[str, Any] = {}
        for name, value in ba.arguments.items():
            p = self.signature.parameters[name]
            if p.kind is p.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(self.model).__name__}.forward takes no extra positional arguments")
                continue
            items = value.items() if p.kind is p.VAR_KEYWORD else [(name, value)]
            default = None if p.kind is p.VAR_KEYWORD else p.default
            for k, v in items:
                if v is default or (isinstance(v, _SIMPLE) and isinstance(default, _SIMPLE) and type(v) is type(default)
                                    and v == default):
                    continue
                out[k] = v
        return out

    @staticmethod
    def key(bound: dict[str, Any], leaves: dict[str, list[Any]] | None = None) -> tuple:
        """The call's signature key; ``leaves`` (when given) receives each input's flattened leaves."""
        parts = []
        for k, v in bound.items():
            if isinstance(v, torch.Tensor):
                parts.append((k, "", ((_T, v.dtype, v.dim(), v.device.type),)))
                if leaves is not None:
                    leaves[k] = [v]
            else:
                flat, spec = tree_flatten(v)
                parts.append((k, spec, tuple(_desc(x) for x in flat)))  # TreeSpec: hashable, compared by value
                if leaves is not None:
                    leaves[k] = flat
        return tuple(parts)

    def set_primary(self, gm: fx.GraphModule, names: list[str], inputs: tuple, consts: dict[str, Any]) -> None:
        bound = self.bind((), {**dict(zip(names, inputs)), **consts})
        self.primary_key = self.key(bound)
        self.primary = _Entry(list(names), _guards(gm, len(tree_flatten(list(inputs))[0])), None)

    # -- dispatch -----------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> Any:
        p = self.primary
        if (not kwargs and p is not None and len(args) == len(p.names)
                and all(isinstance(a, torch.Tensor) for a in args)):
            bound = dict(zip(p.names, args))  # the graph's own positional order (what lrc itself calls)
        else:
            bound = self.bind(args, kwargs)
        entry = self.entry(gm, bound)
        values = [bound[n] for n in entry.names]
        if entry.gm is gm:
            if self.run_primary is not None:
                return self._run(gm, _Entry(entry.names, None, self.run_primary), values)
            return nn.Module.__call__(gm, *values)
        return self._run(gm, entry, values)

    def sync(self, gm: fx.GraphModule) -> None:
        """Drop the variants when the primary graph was rewritten since the last call (``torch.compile``
        calls this first, so the dispatcher has no state left to change, and dynamo no guard to fail)."""
        if self.stamp is not gm._code:
            self.variants.clear()
            self.derived.clear()
            self.stamp = gm._code

    def entry(self, gm: fx.GraphModule, bound: dict[str, Any]) -> _Entry:
        """The graph that serves the call ``bound`` (``entry.gm is gm`` for the primary), traced if new."""
        by_name: dict[str, list[Any]] = {}
        key = self.key(bound, by_name)
        self.sync(gm)
        p = self.primary
        if key == self.primary_key and p is not None and p.fits([x for n in p.names for x in by_name[n]]):
            return _Entry(p.names, p.guards, gm)
        for entry in self.variants.get(key, ()):
            if entry.fits([x for n in entry.names for x in by_name[n]]):
                return entry
        if self.parent is not None:
            return self._derived_entry(gm, bound)
        entry = self._trace_variant(gm, bound, key)
        self.variants.setdefault(key, []).append(entry)
        return entry

    def _derived_entry(self, gm: fx.GraphModule, bound: dict[str, Any]) -> _Entry:
        """The parent's graph for ``bound``, rewritten by ``post`` once per parent graph."""
        face, parent_gm = self.parent  # type: ignore[misc]
        pe = face.entry(parent_gm, bound)
        if pe.gm is parent_gm:
            return _Entry(pe.names, pe.guards, gm)
        hit = self.derived.get(id(pe.gm))
        if hit is None or hit[0] is not pe.gm:
            post = self.post(pe.gm)  # type: ignore[misc]
            post.train(gm.training)
            hit = self.derived[id(pe.gm)] = (pe.gm, post)
        return _Entry(pe.names, pe.guards, hit[1])

    @staticmethod
    def _run(gm: fx.GraphModule, entry: _Entry, values: list[Any]) -> Any:
        """Run ``entry``'s graph (or compiled module) in ``gm``'s train/eval mode."""
        if entry.gm.training != gm.training:
            entry.gm.train(gm.training)
        return entry.gm(*values)

    def _trace_variant(self, gm: fx.GraphModule, bound: dict[str, Any], key: tuple) -> _Entry:
        names = [k for k, v in bound.items() if _has_tensor(v)]
        consts = {k: v for k, v in bound.items() if k not in names}
        values = [bound[n] for n in names]
        try:
            with self.plain_forward():
                var = export_call(self.model, names, values, consts, root=gm)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001 - reported with the call that needed it
            raise TraceError(f"could not trace {type(self.model).__name__} for the call ({', '.join(bound)}): "
                             f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
        share_hierarchy(gm, var)
        # the module, not the node's mark, says which method runs there: a named set (lrc.adapter_sets.set_adapter)
        # may have swapped another method's modules in; the variant's insert then reuses exactly those modules
        records = [{"site": m.site, "method": mod.name, "args": dict(mod.config)} for _, m, mod in adapter_sites(gm)]
        pmeta = lrc_meta(gm)
        # the primary's fully trained modules (heads) are shared already: the variant's freezing must keep them
        lrc_meta(var).update(trainable_extra=list(pmeta.get("trainable_extra", ())),
                             full_modules=list(pmeta.get("full_modules", ())))
        if records:
            # the variant shares the primary's adapter modules before its own insert calls them, so the
            # graph is only whole after the pipeline: verify once at the end
            check = verify_enabled()
            with verification(False):
                apply_records(var, records, source=f"the adapters of {type(self.model).__name__}")
            if check:
                verify(var)
        var.train(gm.training)
        lrc_meta(var).update(specs=list(lrc_meta(gm).get("specs", [])), variant_of=id(gm))
        return _Entry(names, _guards(var, len(tree_flatten(values)[0])), var)

    # -- routing the original model's forward (generate) ------------------------------------------
    @contextmanager
    def plain_forward(self) -> Iterator[None]:
        """The original model's own forward (undo :meth:`routed` while tracing it)."""
        prev = self.model.__dict__.pop("forward", _MISSING)
        try:
            yield
        finally:
            if prev is not _MISSING:
                self.model.__dict__["forward"] = prev

    @contextmanager
    def routed(self, gm: fx.GraphModule) -> Iterator[nn.Module]:
        """The original model with its forward running ``gm``'s graphs (restored afterwards)."""
        model = self.model

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self(gm, args, kwargs)

        forward.__signature__ = self.signature  # type: ignore[attr-defined]  # generate inspects it
        prev = model.__dict__.get("forward", _MISSING)
        model.__dict__["forward"] = forward
        try:
            yield model
        finally:
            if prev is _MISSING:
                model.__dict__.pop("forward", None)
            else:
                model.__dict__["forward"] = prev
