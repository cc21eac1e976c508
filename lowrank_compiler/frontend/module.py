"""The model object every lrc entry point returns: a GraphModule with the original model's face.

:class:`LrcGraphModule` runs each call through its :class:`~lowrank_compiler.frontend.face.Face` (every signature the
original accepted), and carries what users reach for: ``generate``, ``config``, ``save_pretrained``, the HF Trainer's
adapters-only ``state_dict``, dtype moves. Graphs made from it (lowerings, ``lrc.compile``) get the same face through
:meth:`LrcGraphModule.lrc_derive`, so lowering is a property of every graph the model holds.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import LrcError
from lowrank_compiler.frontend.checkpoint import called_by_trainer_save, trained_keys
from lowrank_compiler.frontend.dtypes import baked_dtypes, dtype_change
from lowrank_compiler.frontend.eager import eager_adapters, eager_ready, fold_default, merged_tensors, over_tensors
from lowrank_compiler.frontend.face import Face
from lowrank_compiler.frontend.tied import drop_aliases, fill_aliases
from lowrank_compiler.ir import lrc_meta
from lowrank_compiler.spec.report import print_trainable_parameters

#: LrcGraphModule methods a higher import layer implements; ``lowrank_compiler.adapter_sets`` registers them on
#: import: "save_pretrained" (adapters-only directory), "per_row_adapters" (``generate(adapter_names=...)``)
PROVIDED: dict[str, Callable[..., Any]] = {}


def _provided(name: str) -> Callable[..., Any]:
    fn = PROVIDED.get(name)
    if fn is None:
        raise LrcError(f"{name} needs lowrank_compiler.adapter_sets (import lowrank_compiler first)")
    return fn


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

    def lrc_derive(self, gm: fx.GraphModule, post: Callable[[fx.GraphModule], nn.Module],
                   run_primary: nn.Module | None = None) -> LrcGraphModule:
        """Give ``gm`` (``post`` applied to this graph, sharing its parameters) this model's face: every call this
        model serves, each other signature's graph rewritten by ``post`` on first use (lowerings, ``lrc.compile``)."""
        face = self.lrc_face
        if face is None:
            raise LrcError("lrc_derive needs a model with a face (one made by lrc.transform or lrc.load)")
        if not isinstance(gm, LrcGraphModule):
            gm.__class__ = type("GraphModuleImpl", (LrcGraphModule,), {})
        gm.__dict__["_lrc_face"] = face.derive_face(self, post, run_primary)
        gm.recompile()
        return gm

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
    def generate(self, *args: Any, lrc_graphs: bool = False, lrc_fold: bool | None = None, **kwargs: Any) -> Any:
        """The original model's ``generate`` (greedy, sampling, KV cache ...) with this model's adapters.

        When the graph is the original model plus adapters, the original modules run eagerly with each
        adapted linear calling its adapter (``frontend/eager.py``: HF's speed, the graph's tokens);
        otherwise, or with ``lrc_graphs=True``, its forward is routed through this model's graphs.
        On the eager path, sites with an exact merge (LoRA and the methods sharing its forward) run over
        W + ΔW folded once for this call (base speed; nothing written): ``lrc_fold=None`` folds the smallest
        weights first while the copies total ≤ ``LRC_GENERATE_FOLD_MB`` (256 MiB), and not at all for a call
        making fewer than 32 new tokens (the fold would not pay back); True folds all, False none.
        """
        face: Face | None = self.__dict__.get("_lrc_face")
        if face is None or not hasattr(face.model, "generate"):
            raise AttributeError("generate needs the original HF model (transform an HF model with a generate method)")
        names = kwargs.pop("adapter_names", None)  # PEFT's per-row adapters ("__base__": none)
        if names is None and not lrc_graphs and eager_ready(self, face.model):
            fold = fold_default(face.model, args, kwargs) if lrc_fold is None else lrc_fold
            with eager_adapters(self, face.model, fold) as model:
                return model.generate(*args, **kwargs)
        merged = None if names is not None or lrc_graphs else merged_tensors(self, face.model)
        if merged is not None:  # lrc.merge's graph: the original modules over the merged weights (the base's speed)
            with over_tensors(face.model, merged) as model:
                return model.generate(*args, **kwargs)
        gm: fx.GraphModule = self
        if names is not None:  # per-row routing needs graphs that call the adapter modules
            face, gm = face.adapter_root(self)
        rows = contextlib.nullcontext() if names is None else _provided("per_row_adapters")(gm, names, kwargs)
        with rows, face.routed(gm) as model:
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
