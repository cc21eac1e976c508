"""The named pipelines: each is a list of passes run by the pass manager (``passes/manager.py``).

| pipeline   | passes                          | works on                      | used by                          |
|------------|---------------------------------|-------------------------------|----------------------------------|
| adapt      | match(spec), insert, full       | the traced graph, in place    | transform, load, load_peft       |
| transform  | adapt + initialize(data)        | the traced graph, in place    | ``lrc.transform``                |
| merge      | merge                           | a copy made by the caller     | ``lrc.merge``, exports, compile  |
| base       | strip                           | returns a new graph           | save (base program), validation  |
| separate   | separate                        | returns a new graph           | ONNX export with adapters apart  |
| set_merged | set_merged(True / False)        | in place, adapters kept       | merge_adapters / unmerge_adapters|

The lowering pipelines (speed and memory) live with their passes in ``lowerings/lower.py``.
Copies are made at the API edge (``api.merge`` deep-copies before the in-place merge pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx

from lowrank_compiler.errors import LoadError, SpecError
from lowrank_compiler.passes.full import train_full
from lowrank_compiler.passes.initialize import initialize
from lowrank_compiler.passes.insert import insert
from lowrank_compiler.passes.manager import Pass, Pipeline
from lowrank_compiler.passes.match import match
from lowrank_compiler.passes.merge import merge
from lowrank_compiler.passes.separate import separate
from lowrank_compiler.passes.set_merged import set_merged
from lowrank_compiler.passes.strip import strip
from lowrank_compiler.spec.language import Spec
from lowrank_compiler.spec.sites import find_sites


def adapter_pipeline(spec: Spec) -> Pipeline:
    """Mark the sites ``spec`` adapts, insert their adapters, and train its ``full`` modules (in place)."""
    return Pipeline("adapt", [Pass("match", lambda g: match(g, spec)), Pass("insert", insert), Pass("full", train_full)])


def transform_pipeline(spec: Spec, data: Iterable[Any] | None = None,
                       loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                       init_batches: int | None = None, progress: bool = True) -> Pipeline:
    """``adapt`` plus the data-dependent initialization (a no-op when no adapter needs data)."""
    init = Pass("initialize", lambda g: initialize(g, data, loss_fn, batches=init_batches, progress=progress))
    return Pipeline("transform", [*adapter_pipeline(spec).passes, init])


def merge_pipeline() -> Pipeline:
    """Fold every adapter into its weight and remove it (in place: copy first to keep the input)."""
    return Pipeline("merge", [Pass("merge", merge)])


def base_pipeline() -> Pipeline:
    """A new graph over the same parameters with every adapter call replaced by its base linear."""
    return Pipeline("base", [Pass("strip", strip, inplace=False)])


def separate_pipeline(placeholder_seed: int | None = None) -> Pipeline:
    """A new graph where each low-rank adapter is an explicit ``(x @ A) @ B`` branch (ONNX adapters)."""
    return Pipeline("separate", [Pass("separate", lambda g: separate(g, placeholder_seed), inplace=False)])


def set_merged_pipeline(merged: bool) -> Pipeline:
    """Merge or unmerge every adapter in place, keeping the adapters."""
    return Pipeline("merge_adapters" if merged else "unmerge_adapters",
                    [Pass("set_merged", lambda g: set_merged(g, merged))])


def apply_records(gm: fx.GraphModule, records: list[dict[str, Any]], source: str = "the records",
                  full_modules: list[str] = ()) -> None:
    """Insert exactly the adapters the records name and train ``full_modules``, decided like a spec (one
    exact-name rule per site or module).

    Raises:
        LoadError: a record that does not parse as a rule (method, arguments) or names no site of the model.
    """
    if not records and not full_modules:
        return
    have = {s.name for s in find_sites(gm) if not s.refused}
    missing = [r.get("site") for r in records if isinstance(r, dict) and r.get("site") not in have]
    if missing:
        raise LoadError(f"{source}: the model has no linear site(s) {missing[:5]}; sites are e.g. {sorted(have)[:5]}")
    try:
        spec = Spec.for_sites([*((r["site"], r["method"], r.get("args", {})) for r in records),
                               *((path, "full", {}) for path in full_modules)])
        adapter_pipeline(spec)(gm)
    except SpecError as e:
        raise LoadError(f"{source}: the saved adapters don't fit the model: {e.reason if e.column is None else e}") \
            from None
    except (KeyError, TypeError) as e:
        raise LoadError(f"{source}: malformed adapter record ({type(e).__name__}: {e})") from None
