"""Mixed-adapter batches: one graph, one call, every row with its own adapter (training and inference).

``mgm = lrc.adapter_sets.mixed_batch(gm, ["a", "b"])`` returns a graph that takes one more input, ``adapter_ids``
(one int per row: k = the k-th named adapter, −1 = the base model). It shares the base weights and the
named adapters' modules with ``gm``, so training ``mgm`` trains those adapters, and ``set_adapter(gm, "a")``
then serves what was trained. FLoRA models route the ids to their own per-row adapters. For a model transformed
from an HF model the result has its face (``mixed_face.py``): every other call with ``adapter_ids=`` and
``generate(..., adapter_ids=... | adapter_names=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from lowrank_compiler.adapter_sets.mixed_face import give_face
from lowrank_compiler.adapter_sets.named import _thaw, adapter_names, named_adapter_modules
from lowrank_compiler.errors import LrcError
from lowrank_compiler.ir import META_KEY, adapter_nodes, logical_weight, lrc_meta
from lowrank_compiler.passes.mixed import IDS, MixedAdapter, mixed, mixed_nodes

SLOTS = "mixed_slots"


def mixed_batch(gm: fx.GraphModule, adapters: Sequence[str] | None = None, *, capacity: int | None = None,
                rank: int | None = None, trainable: bool = True) -> fx.GraphModule:
    """A graph serving batches whose rows use different named adapters, selected by ``adapter_ids``.

    ``adapters``: the named sets, in slot order (default: all, the active one first). ``capacity``
    (default: their number) and ``rank`` (default: their largest rank) size the stacked buffers the
    no-grad path reads, so adding adapters up to ``capacity`` (``mixed_add``) changes no shape: no
    ``torch.compile`` recompile, no ONNX re-export. ``trainable``: every slot's adapter trains, and
    stays trainable when ``set_adapter(gm, ...)`` makes it inactive in ``gm``.

    Raises:
        LrcError: unknown adapter names, capacity below their number, a method that cannot be stacked.
    """
    names = list(adapters) if adapters is not None else adapter_names(gm)
    if not names:
        raise LrcError("mixed_batch needs at least one adapter name")
    unknown = [n for n in names if n not in adapter_names(gm)]
    if unknown:
        raise LrcError(f"no adapter named {unknown}; the model has {adapter_names(gm)}")
    sets = {n: named_adapter_modules(gm, n) for n in names}
    sites = [node.meta[META_KEY].site for node in adapter_nodes(gm)]
    members = {s: [sets[n][s] for n in names] for s in sites}
    cap = len(names) if capacity is None else int(capacity)
    if cap < len(names):
        raise LrcError(f"capacity={cap} is smaller than the {len(names)} adapters {names}")
    r = rank if rank is not None else max((_rank(m, logical_weight(gm, node.meta[META_KEY]))
                                           for node in adapter_nodes(gm) for m in members[node.meta[META_KEY].site]),
                                          default=1)
    native = {s: mods[0].n_slots for s, mods in members.items() if mods[0].batched}
    if native and (len(native) != len(members) or len(set(native.values())) != 1):
        raise LrcError("a model with per-row adapters (FLoRA) needs them at every adapted site with the same "
                       f"n_adapters; got {native} of {len(members)} sites")
    if native:
        names = [str(k) for k in range(next(iter(native.values())))]
    if trainable:
        for mods in members.values():
            for m in mods:
                _thaw(m)
                m.mixed_trainable = True  # set_adapter(gm, ...) no longer freezes it
    out = mixed(gm, members, cap, r).gm
    meta = lrc_meta(out)
    meta[SLOTS] = names
    inputs = tuple(meta.get("example_inputs") or ())
    if inputs and isinstance(inputs[0], torch.Tensor):
        n = inputs[0].shape[0]
        meta["example_inputs"] = inputs + (torch.arange(n) % (len(names) + 1) - 1,)
        meta["input_names"] = list(meta.get("input_names") or []) + [IDS]
    return give_face(out, gm)


def _rank(m: object, w: torch.Tensor) -> int:
    f = m.mixed_factors(w) if not getattr(m, "batched", False) else None
    return 1 if f is None else int(f.A.shape[0])


def slots(mgm: fx.GraphModule) -> list[str]:
    """The adapter name of each slot of a mixed graph (slot k = ``adapter_ids`` value k)."""
    return list(lrc_meta(mgm).get(SLOTS, []))


def adapter_ids(mgm: fx.GraphModule, names: Sequence[str | None], device: torch.device | str | None = None
                ) -> torch.Tensor:
    """The ``adapter_ids`` tensor for rows using ``names`` (None or ``"base"`` → −1), PEFT's ``adapter_names=``."""
    table = slots(mgm)
    bad = [n for n in names if n not in (None, "base", "__base__") and n not in table]
    if bad:
        raise LrcError(f"unknown adapter names {sorted(set(map(str, bad)))}; this mixed graph has slots {table}")
    return torch.tensor([-1 if n in (None, "base", "__base__") else table.index(n) for n in names],
                        dtype=torch.long, device=device)


def mixed_add(mgm: fx.GraphModule, gm: fx.GraphModule, name: str, *, trainable: bool = True) -> int:
    """Append ``gm``'s named adapter ``name`` to the mixed graph's next free slot (within its capacity:
    no shape changes, so a compiled ``mgm`` does not recompile); returns the slot index."""
    mods = named_adapter_modules(gm, name)
    nodes = mixed_nodes(mgm)
    full = [mark.site for _, mark, mod in nodes if len(mod.members) >= mod.capacity]
    if full:
        raise LrcError(f"the mixed graph is full (capacity {nodes[0][2].capacity}); build it with a larger "
                       "capacity= to add adapters without re-export")
    for _, mark, mod in nodes:
        m = mods[mark.site]
        if trainable:
            _thaw(m)
            m.mixed_trainable = True
        mod.members.append(m)
        mod.refresh(logical_weight(mgm, mark))
    lrc_meta(mgm)[SLOTS] = slots(mgm) + [name]
    return len(slots(mgm)) - 1


def refresh(mgm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every site's stacked buffers from its adapters (eager calls do this by themselves; call it
    after changing adapters and before running a compiled or exported copy without grad)."""
    for _, mark, mod in mixed_nodes(mgm):
        mod.refresh(logical_weight(mgm, mark))
    return mgm


def mixed_modules(mgm: fx.GraphModule) -> dict[str, MixedAdapter]:
    """``{site: MixedAdapter}`` of a mixed graph."""
    return {mark.site: mod for _, mark, mod in mixed_nodes(mgm)}
