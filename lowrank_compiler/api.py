"""The public Python API: transform, adapters, merge/unmerge, summaries."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.frontend.trace import trace
from lowrank_compiler.ir import adapters_of
from lowrank_compiler.lowerings import lower
from lowrank_compiler.methods.base import AdapterMethod
from lowrank_compiler.passes.pipelines import merge_pipeline, set_merged_pipeline, transform_pipeline
from lowrank_compiler.quiet import quiet
from lowrank_compiler.spec.language import Spec, parse_spec
from lowrank_compiler.spec.report import print_trainable_parameters, trainable_parameters  # noqa: F401  (API)


def transform(
    model: nn.Module,
    spec: str | Spec,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    init_batches: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
    trace_cache: bool | None = None,
) -> fx.GraphModule:
    """Trace ``model``, insert the adapters ``spec`` asks for, and initialize them.

    Each trace (this one and each later call signature's) is stored in, and read back from, the trace
    cache (README, "The trace cache"); ``trace_cache=False`` (or ``LRC_TRACE_CACHE=0``) always traces.

    The returned GraphModule shares the model's (now frozen) base parameters; only adapter
    parameters require grad, and those of modules a ``full`` rule trains (copied first).
    Data-dependent methods (e.g. ``loraga``) need ``data`` (an iterable of batches, each passed to the graph as ``gm(*batch)`` / ``gm(**batch)``) and
    ``loss_fn(output, batch) -> scalar``.

    Raises:
        SpecError: bad spec, a rule that matches no site, or arguments that don't fit a site.
        TraceError: the model could not be traced.
        InitError: a data-dependent method is missing ``data``/``loss_fn`` or saw non-finite gradients.
    """
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
    gm = trace(model, example_inputs, example_kwargs, strategy=strategy, trace_cache=trace_cache)
    return transform_pipeline(parsed, data, loss_fn, init_batches, progress)(gm).gm


def adapters(gm: fx.GraphModule) -> dict[str, AdapterMethod]:
    """``{site_name: adapter_module}`` in graph order."""
    return adapters_of(gm)


@quiet
def merge(gm: fx.GraphModule, inplace: bool = False, *, keep_adapters: bool = False) -> fx.GraphModule:
    """Fold every adapter into its weight.

    Default: a plain GraphModule without adapters (a copy unless ``inplace``). ``keep_adapters=True``: fold
    in place and keep the adapters, so :func:`unmerge` undoes it (inverse within fp32 rounding).
    """
    if keep_adapters:
        return set_merged_pipeline(True)(gm).gm
    return merge_pipeline()(gm if inplace else copy.deepcopy(gm)).gm


def unmerge(gm: fx.GraphModule) -> fx.GraphModule:
    """Undo ``merge(gm, keep_adapters=True)``: restore the base weights and the separate adapter branch."""
    return set_merged_pipeline(False)(gm).gm


def merge_adapters(gm: fx.GraphModule) -> fx.GraphModule:
    """Deprecated: ``merge(gm, keep_adapters=True)``."""
    return merge(gm, keep_adapters=True)


def unmerge_adapters(gm: fx.GraphModule) -> fx.GraphModule:
    """Deprecated: ``unmerge(gm)``."""
    return unmerge(gm)


def lower_memory(gm: fx.GraphModule, *, attention: str | None = "recompute", mask: str = "bool",
                 dropout: bool = True, ffn: bool = False, checkpoint: bool = False) -> fx.GraphModule:
    """Deprecated: ``lower(gm, "memory", ...)``."""
    return lower(gm, "memory", attention=attention, mask=mask, dropout=dropout, ffn=ffn, checkpoint=checkpoint)
