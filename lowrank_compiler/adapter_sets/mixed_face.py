"""The face of a mixed-adapter graph (``lrc.adapter_sets.mixed_batch``): every call the model accepted, plus ``generate``.

The mixed graph itself serves the call it was traced with, plus ``adapter_ids``. Any other call (``labels=``, a KV-cache
decode step, ``generate``) runs the source model's own face with each of its adapter calls routed, for the duration,
through this graph's :class:`~lowrank_compiler.passes.mixed.MixedAdapter` of that site: the very stacks (and members,
LoRA-GA's offset, FLoRA's native rows) the mixed graph uses, so row i applies slot ``adapter_ids[i]`` in every
signature and gradients reach the same adapters. ``generate`` takes ``adapter_ids=`` or PEFT's ``adapter_names=``
(slot names, ``"__base__"`` for none); rows that ``generate`` expands (beams) keep their row's adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from lowrank_compiler.adapter_sets.rows import BASE_NAMES, expand_factor
from lowrank_compiler.errors import LrcError
from lowrank_compiler.frontend.module import LrcGraphModule
from lowrank_compiler.ir import adapter_sites, lrc_meta
from lowrank_compiler.passes.mixed import IDS, MixedAdapter, MixedMark, mixed_nodes

PARENT = "_lrc_mixed_of"


class MixedGraphModule(LrcGraphModule):
    """A mixed-adapter graph that also serves every other call of its source model (see module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        parent = self.__dict__.get(PARENT)
        names = list(lrc_meta(self).get("input_names") or [])
        if parent is None or _is_graph_call(names, args, kwargs):
            return fx.GraphModule.__call__(self, *args, **kwargs)
        ids = kwargs.pop(IDS, None)
        if not isinstance(ids, torch.Tensor):
            raise LrcError(f"this model serves mixed-adapter batches: pass {IDS}= (a tensor, one int per row, "
                           "-1 = base; lrc.adapter_sets.adapter_ids(model, names) builds it)")
        with routed_rows(parent, self, ids):
            return parent(*args, **kwargs)

    def _original_attr(self, name: str) -> Any:
        parent = self.__dict__.get(PARENT)
        if parent is None:
            return super()._original_attr(name)
        return parent._original_attr(name)

    @property
    def main_input_name(self) -> str:
        parent = self.__dict__.get(PARENT)
        return parent.main_input_name if parent is not None else "input_ids"

    def can_generate(self) -> bool:
        parent = self.__dict__.get(PARENT)
        return bool(parent is not None and parent.can_generate())

    @torch.no_grad()
    def generate(self, *args: Any, adapter_ids: torch.Tensor | None = None, adapter_names: list[str] | None = None,
                 **kwargs: Any) -> Any:
        """The source model's ``generate`` with row i using slot ``adapter_ids[i]`` (or ``adapter_names[i]``)."""
        parent = self.__dict__.get(PARENT)
        if parent is None:
            raise AttributeError("generate needs the mixed graph of a model transformed from an HF model")
        if (adapter_ids is None) == (adapter_names is None):
            raise LrcError("generate on a mixed-adapter model needs exactly one of adapter_ids= (one slot per row) "
                           "or adapter_names= (one slot name per row, '__base__' for none)")
        if adapter_ids is None:
            adapter_ids = ids_of_names(self, adapter_names)
        ids = adapter_ids.repeat_interleave(expand_factor(parent, kwargs))
        with routed_rows(parent, self, ids):
            return parent.generate(*args, **kwargs)


def _is_graph_call(names: list[str], args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether the call gives exactly the mixed graph's own inputs (positionally and/or by name)."""
    if len(args) > len(names) or not all(isinstance(a, torch.Tensor) for a in [*args, *kwargs.values()]):
        return False
    return set(kwargs) == set(names[len(args):])


def ids_of_names(mgm: fx.GraphModule, names: list[str]) -> torch.Tensor:
    """``adapter_ids`` for rows named by slot (``"__base__"``/None: −1)."""
    table = list(lrc_meta(mgm).get("mixed_slots", []))
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise LrcError(f"adapter_names must be a list of slot names, one per batch row; got {names!r:.80}")
    bad = sorted({str(n) for n in names if n not in (None, *BASE_NAMES) and n not in table})
    if bad:
        raise LrcError(f"unknown adapter names {bad}; this mixed graph has slots {table} (and '__base__')")
    return torch.tensor([-1 if n in (None, *BASE_NAMES) else table.index(n) for n in names], dtype=torch.long)


@contextlib.contextmanager
def routed_rows(gm: fx.GraphModule, mgm: fx.GraphModule, ids: torch.Tensor) -> Iterator[None]:
    """Within the block, every adapter call of ``gm``'s graphs applies row i's slot ``ids[i]`` through ``mgm``'s
    stacks; ``gm``'s adapter modules are restored afterwards."""
    stacks = {mark.site: (mod, _base(mgm, mark)) for _, mark, mod in mixed_nodes(mgm)}
    routed = []
    for _, mark, mod in adapter_sites(gm):
        if mark.site not in stacks:
            raise LrcError(f"site {mark.site!r} has an adapter in the model but none in its mixed graph; "
                           "rebuild the mixed graph with lrc.adapter_sets.mixed_batch(model, ...)")
        routed.append((mod, _router(*stacks[mark.site], ids, mark.site)))
    for mod, fn in routed:
        mod.__dict__["forward"] = fn
    try:
        yield
    finally:
        for mod, _ in routed:
            mod.__dict__.pop("forward", None)


def _base(mgm: fx.GraphModule, mark: MixedMark) -> torch.Tensor:
    """The base weight (d_out x d_in) ``mgm`` runs the site on: the original one where slots share an offset."""
    w = mgm.get_parameter(mark.weight_path)
    return w.t() if mark.layout == "conv1d" else w


def _router(stack: MixedAdapter, base: torch.Tensor, ids: torch.Tensor, site: str):
    """``forward(x, weight, bias)`` of a source adapter module that runs ``stack`` with the row ids; a site whose
    slots share a base offset (LoRA-GA) runs on the original base, as the mixed graph does."""

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] != ids.shape[0]:
            raise LrcError(f"site {site!r}: the batch has {x.shape[0]} rows but {IDS} has {ids.shape[0]}")
        return stack(x, base if stack.has_offset else weight, bias, ids.to(x.device))

    return forward


def give_face(mgm: fx.GraphModule, gm: fx.GraphModule) -> fx.GraphModule:
    """Make ``mgm`` (a mixed graph of ``gm``) a :class:`MixedGraphModule`, in place; without ``gm``'s face: as is."""
    if getattr(gm, "lrc_face", None) is None:
        return mgm
    mgm.__class__ = type("GraphModuleImpl", (MixedGraphModule,), {})
    mgm.__dict__[PARENT] = gm
    mgm.recompile()
    return mgm
