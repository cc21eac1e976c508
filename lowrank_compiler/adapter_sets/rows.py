"""Per-row adapters in eager calls and ``generate`` (PEFT's ``adapter_names=[...]``, ``"__base__"`` for none).

``with per_row_adapters(gm, ["a", "b", "__base__"]):`` makes every adapter call of ``gm``'s graphs (the primary
and the dispatcher's variants, e.g. the KV-cache decode step) apply row i's named set: each active adapter
module's ``forward`` is routed, for the duration, through a :class:`~lowrank_compiler.passes.mixed.MixedAdapter`
over the named sets' modules (the same stacks ``mixed_batch`` uses), so nothing is re-traced and the modules the
graphs call are unchanged. ``gm.generate(..., adapter_names=[...])`` runs inside it; rows that ``generate``
expands (``num_beams``, ``num_return_sequences``) keep their row's adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx

from lowrank_compiler.adapter_sets.named import _active_modules, adapter_names, named_adapter_modules
from lowrank_compiler.errors import LrcError
from lowrank_compiler.frontend.module import PROVIDED
from lowrank_compiler.ir import adapter_sites, logical_weight
from lowrank_compiler.passes.mixed import MixedAdapter

BASE_NAMES = ("__base__",)


def expand_factor(gm: fx.GraphModule, generate_kwargs: dict[str, Any] | None) -> int:
    """How many rows ``generate`` makes of each input row: max(num_beams, num_return_sequences), as HF does."""
    if generate_kwargs is None:
        return 1
    cfg = generate_kwargs.get("generation_config") or getattr(gm, "generation_config", None)

    def get(name: str) -> int:
        v = generate_kwargs.get(name, getattr(cfg, name, 1) if cfg is not None else 1)
        return int(v) if isinstance(v, int) and v > 0 else 1

    return max(get("num_beams"), get("num_return_sequences"))


@contextlib.contextmanager
def per_row_adapters(gm: fx.GraphModule, names: Sequence[str], generate_kwargs: dict[str, Any] | None = None
                     ) -> Iterator[fx.GraphModule]:
    """Within the block, batch row i of every call runs the named set ``names[i]`` (``"__base__"``: no adapter).

    Raises:
        LrcError: unknown names, merged adapters, or a method with no additive low-rank form (it cannot be
        stacked per row) or one that moved the base weight (LoRA-GA, Delta-LoRA).
    """
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise LrcError(f"adapter_names must be a list of adapter names, one per batch row; got {names!r}")
    have = adapter_names(gm)
    unknown = sorted({n for n in names if n not in have and n not in BASE_NAMES})
    if unknown:
        raise LrcError(f"adapter_names has unknown adapters {unknown}; the model has {have} (and '__base__')")
    rows = (generate_kwargs or {}).get("input_ids")
    if isinstance(rows, torch.Tensor) and rows.dim() >= 1 and rows.shape[0] != len(names):
        raise LrcError(f"the batch has {rows.shape[0]} rows but adapter_names names {len(names)}; give one name per row")
    slots = list(dict.fromkeys(n for n in names if n not in BASE_NAMES))
    ids = torch.tensor([-1 if n in BASE_NAMES else slots.index(n) for n in names], dtype=torch.long)
    ids = ids.repeat_interleave(expand_factor(gm, generate_kwargs))
    sets = {n: named_adapter_modules(gm, n) for n in slots}
    _active_modules(gm)  # LrcError when the model has no adapters
    routed = []
    for _, mark, mod in adapter_sites(gm):
        members = [sets[n][mark.site] for n in slots]
        w = logical_weight(gm, mark)
        bad = [m.name for m in [mod, *members] if m.merged or m.modifies_base or m.batched
               or m.mixed_factors(w) is None]
        if bad:
            raise LrcError(f"site {mark.site!r}: per-row adapters need unmerged additive adapters that leave the "
                           f"base weight alone (lora, dora, vera ...); {sorted(set(bad))} cannot (lrc.unmerge(gm) "
                           "first if merged)")
        rank = max([int(m.mixed_factors(w).A.shape[0]) for m in members] or [1])
        routed.append((mod, _router(MixedAdapter(members, max(len(members), 1), rank), ids, mark.site)))
    for mod, fn in routed:
        mod.__dict__["forward"] = fn
    try:
        yield gm
    finally:
        for mod, _ in routed:
            mod.__dict__.pop("forward", None)


def _router(mixed: MixedAdapter, ids: torch.Tensor, site: str):
    """``forward(x, weight, bias)`` of an adapter module that applies row i's slot ``ids[i]``."""

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n = ids.shape[0]
        if x.shape[0] % n:
            raise LrcError(f"site {site!r}: the batch has {x.shape[0]} rows but adapter_names names {n}")
        return mixed(x, weight, bias, ids.to(x.device))

    return forward


PROVIDED["per_row_adapters"] = per_row_adapters
