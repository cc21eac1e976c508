"""The transformed model keeps the original's face: every call it accepted, and what users reach for.

One module hierarchy (base weights + adapter modules), many graphs. A traced graph accepts exactly
the inputs it was traced with, so :class:`LrcGraphModule` normalises each call against the original
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

import contextlib
import copy
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from lowrank_compiler.errors import LrcError, TraceError
from lowrank_compiler.frontend.capture import export_call
from lowrank_compiler.frontend.checkpoint import called_by_trainer_save, trained_keys
from lowrank_compiler.frontend.dtypes import baked_dtypes, dtype_change
from lowrank_compiler.frontend.eager import eager_adapters, eager_ready
from lowrank_compiler.frontend.hierarchy import share_hierarchy
from lowrank_compiler.frontend.tied import drop_aliases, fill_aliases
from lowrank_compiler.ir import adapter_sites, lrc_meta, verify
from lowrank_compiler.passes.manager import verification, verify_enabled
from lowrank_compiler.passes.pipelines import apply_records
from lowrank_compiler.spec.report import print_trainable_parameters

_MISSING = object()
_SIMPLE = (bool, int, float, str, type(None))

#: LrcGraphModule methods a higher import layer implements; ``lowrank_compiler.adapter_sets`` registers them on
#: import: "save_pretrained" (adapters-only directory), "per_row_adapters" (``generate(adapter_names=...)``)
PROVIDED: dict[str, Callable[..., Any]] = {}


def _provided(name: str) -> Callable[..., Any]:
    fn = PROVIDED.get(name)
    if fn is None:
        raise LrcError(f"{name} needs lowrank_compiler.adapter_sets (import lowrank_compiler first)")
    return fn


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
        self.announced: set[tuple] = set()
        # a derived face (a lowering of another graph): its variants are the parent's, rewritten by ``post``
        self.parent: tuple[Face, fx.GraphModule] | None = None
        self.post: Callable[[fx.GraphModule], fx.GraphModule] | None = None
        self.derived: dict[int, tuple[fx.GraphModule, nn.Module]] = {}
        self.run_primary: nn.Module | None = None  # runs the primary graph instead of the module (compiled)

    def __deepcopy__(self, memo: dict[int, Any]) -> Face:
        new = Face(self.model, self.signature)  # the original model is shared, never copied
        new.primary_key, new.primary = self.primary_key, copy.copy(self.primary)
        return new

    def derive(self, parent_gm: fx.GraphModule, gm: fx.GraphModule, post: Callable[[fx.GraphModule], nn.Module],
               run_primary: nn.Module | None = None) -> LrcGraphModule:
        """Give ``gm`` (``post`` applied to ``parent_gm``, sharing its parameters) this face: every call
        ``parent_gm`` serves, each other signature's graph taken from ``parent_gm`` and rewritten by ``post``.
        ``run_primary`` (e.g. the compiled primary graph) runs ``gm``'s own signature instead of ``gm``."""
        new = Face(self.model, self.signature)
        new.primary_key, new.primary = self.primary_key, copy.copy(self.primary)
        new.parent, new.post, new.run_primary = (self, parent_gm), post, run_primary
        if not isinstance(gm, LrcGraphModule):
            gm.__class__ = type("GraphModuleImpl", (LrcGraphModule,), {})
        gm.__dict__["_lrc_face"] = new
        gm.recompile()
        return gm

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

    def _announce(self, key: tuple) -> None:
        if key in self.announced:
            return
        self.announced.add(key)
        desc = ", ".join(f"{k}={leaves[0][2]!r}" if len(leaves) == 1 and leaves[0][0] == "V"
                         else k if isinstance(spec, str) else f"{k}[{len(leaves)} tensors]" for k, spec, leaves in key)
        print(f"lrc: tracing {type(self.model).__name__} for a new call signature ({desc}); once per signature",
              file=sys.stderr)

    def _trace_variant(self, gm: fx.GraphModule, bound: dict[str, Any], key: tuple) -> _Entry:
        self._announce(key)
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
        records = [{"site": m.site, "method": m.method, "args": dict(mod.config)} for _, m, mod in adapter_sites(gm)]
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


class LrcGraphModule(fx.GraphModule):
    """A GraphModule that accepts every call the original model accepted (see module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        face: Face | None = self.__dict__.get("_lrc_face")
        if face is None:
            return super().__call__(*args, **kwargs)
        return face(self, args, kwargs)

    def recompile(self) -> Any:
        out = super().recompile()
        self._sync_signature()
        return out

    def _sync_signature(self) -> None:
        face: Face | None = self.__dict__.get("_lrc_face")
        if face is not None:  # tools that read forward's signature (HF Trainer's column filter) see the model's
            params = list(face.signature.parameters.values())
            self_p = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            type(self).forward.__signature__ = face.signature.replace(parameters=[self_p, *params])

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``to`` / ``half`` / ``cuda`` ...; a floating dtype change is refused (LrcError, nothing converted) when
        the traced graph has its dtype baked in, and drops the traced variants otherwise."""
        new = dtype_change(fn, self.dtype)
        if new is not None:
            baked = baked_dtypes(self)
            if baked:
                raise LrcError(f"cannot convert this model to {new}: its traced graph fixes {self.dtype} in "
                               f"{len(baked)} ops (e.g. {baked[0]}); transform the model in the dtype it will run "
                               f"in: lrc.transform(model.to({new}), spec)")
            face = self.__dict__.get("_lrc_face")
            if face is not None:
                face.variants.clear()
        return super()._apply(fn, recurse)

    #: what the HF Trainer's checkpoints hold: "adapters" (what training changes, frontend/checkpoint.py) or "full"
    trainer_checkpoint: str = "adapters"

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """torch's ``state_dict``, with a tensor tied under several names listed once (safetensors-safe); for the
        HF Trainer's checkpoint write, only what training changes (``trainer_checkpoint = "full"``: everything)."""
        out = super().state_dict(*args, **kwargs)
        drop_aliases(self, out, kwargs.get("prefix", args[1] if len(args) > 1 else ""))
        if not args and not kwargs and self.trainer_checkpoint == "adapters" and called_by_trainer_save():
            keep = trained_keys(self)
            out = type(out)((k, v) for k, v in out.items() if k in keep)
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """torch's ``load_state_dict``; a dict of exactly what training changes (an adapters-only checkpoint) is
        complete: the frozen base tensors it leaves out are not missing."""
        keep = trained_keys(self)
        if not state_dict or not all(k in keep for k in state_dict):
            return super().load_state_dict(state_dict, strict, assign)
        res = super().load_state_dict(state_dict, False, assign)
        missing = [k for k in res.missing_keys if k in keep]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading the adapters-only state_dict for {type(self).__name__}: "
                               f"missing {missing[:8]}, unexpected {res.unexpected_keys[:8]}")
        return type(res)(missing, res.unexpected_keys)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        fill_aliases(self, state_dict, prefix)  # runs before the children load (and check for missing keys)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __deepcopy__(self, memo: dict[int, Any]) -> LrcGraphModule:
        res = super().__deepcopy__(memo)  # GraphModule's copy keeps the class but drops other attributes
        face = self.__dict__.get("_lrc_face")
        if face is not None:
            res.__dict__["_lrc_face"] = copy.deepcopy(face, memo)
            res._sync_signature()
        return res

    # -- what users reach for --------------------------------------------------------------------
    @property
    def lrc_face(self) -> Face | None:
        return self.__dict__.get("_lrc_face")

    def _original_attr(self, name: str) -> Any:
        face = self.__dict__.get("_lrc_face")
        if face is None or not hasattr(face.model, name):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (the original model had none)")
        return getattr(face.model, name)

    @property
    def config(self) -> Any:
        return self._original_attr("config")

    @property
    def generation_config(self) -> Any:
        return self._original_attr("generation_config")

    @property
    def main_input_name(self) -> str:
        face = self.__dict__.get("_lrc_face")
        return getattr(face.model, "main_input_name", "input_ids") if face else "input_ids"

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def print_trainable_parameters(self) -> str:
        """Print and return PEFT's line: 'trainable params: N || all params: M || trainable%: P'."""
        return print_trainable_parameters(self)

    def can_generate(self) -> bool:
        face = self.__dict__.get("_lrc_face")
        return bool(face and hasattr(face.model, "generate") and getattr(face.model, "can_generate", lambda: False)())

    @torch.no_grad()
    def generate(self, *args: Any, lrc_graphs: bool = False, **kwargs: Any) -> Any:
        """The original model's ``generate`` (greedy, sampling, KV cache ...) with this model's adapters.

        When the graph is the original model plus adapters, the original modules run eagerly with each
        adapted linear calling its adapter (``frontend/eager.py``: HF's speed, the graph's tokens);
        otherwise, or with ``lrc_graphs=True``, its forward is routed through this model's graphs.
        """
        face: Face | None = self.__dict__.get("_lrc_face")
        if face is None or not hasattr(face.model, "generate"):
            raise AttributeError("generate needs the original HF model (transform an HF model with a generate method)")
        names = kwargs.pop("adapter_names", None)  # PEFT's per-row adapters ("__base__": none)
        if names is None and not lrc_graphs and eager_ready(self, face.model):
            with eager_adapters(self, face.model) as model:
                return model.generate(*args, **kwargs)
        rows = contextlib.nullcontext() if names is None else _provided("per_row_adapters")(self, names, kwargs)
        with rows, face.routed(self) as model:
            return model.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any:
        """Write the adapters and ``full`` modules only, in PEFT's layout where PEFT can hold the methods
        (``lrc.adapter_sets.save_pretrained``; read back with ``lrc.adapter_sets.from_pretrained``)."""
        return _provided("save_pretrained")(self, save_directory, **kwargs)


def attach(gm: fx.GraphModule, model: nn.Module | None) -> LrcGraphModule:
    """Turn ``gm`` into an :class:`LrcGraphModule` (in place) that dispatches calls like ``model``."""
    if not isinstance(gm, LrcGraphModule):
        gm.__class__ = type("GraphModuleImpl", (LrcGraphModule,), {})
    meta = lrc_meta(gm)
    if model is not None and meta.get("trace") == "export" and meta.get("input_names"):
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:
            face = Face(model, sig)
            try:
                face.set_primary(gm, list(meta["input_names"]), tuple(meta.get("example_inputs") or ()),
                                 dict(meta.get("const_kwargs") or {}))
            except TypeError:
                face = None
            if face is not None:
                gm.__dict__["_lrc_face"] = face
    gm.recompile()
    return gm
