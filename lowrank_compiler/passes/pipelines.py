"""The named pipelines: each is a list of passes run by the pass manager (``passes/manager.py``).

| pipeline   | passes                          | works on                      | used by                          |
|------------|---------------------------------|-------------------------------|----------------------------------|
| adapt      | match(spec), insert, full       | the traced graph, in place    | transform, load, load_peft       |
| transform  | adapt + initialize(data)        | the traced graph, in place    | ``lrc.transform``                |
| merge      | merge                           | a copy made by the caller     | ``lrc.merge``, exports, compile  |
| base       | strip                           | returns a new graph           | save (base program), validation  |
| separate   | separate                        | returns a new graph           | ONNX export with adapters apart  |
| set_merged | set_merged(True / False)        | in place, adapters kept       | merge_adapters / unmerge_adapters|
| memory     | lean_attention, lean_dropout, lean_ffn, checkpoint_blocks (each optional) | returns a new graph sharing the parameters | ``lrc.lower_memory`` |

Copies are made at the API edge (``api.merge`` deep-copies before the in-place merge pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lowrank_compiler.errors import LrcError
from lowrank_compiler.lowerings.checkpoint_blocks import checkpoint_blocks
from lowrank_compiler.lowerings.lean_attention import lean_attention
from lowrank_compiler.lowerings.lean_dropout import lean_dropout
from lowrank_compiler.lowerings.lean_ffn import lean_ffn
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


ATTENTION_MODES = ("recompute", "probs", None)


def memory_pipeline(attention: str | None = "recompute", mask: str = "bool", dropout: bool = True,
                    ffn: bool = False, checkpoint: bool = False) -> Pipeline:
    """Training-memory lowerings (each returns a new graph over the same parameters; see docs/memory.md).

    ``attention``: "recompute" (dropout attention saves q, k, v and a mask), "probs" (saves the softmax
    output and a mask, no recompute) or None; ``mask``: "bool" or "rng"; ``dropout``: hidden dropouts save a
    bool mask, not the float noise; ``ffn``: gelu(frozen linear) keeps the linear's input and recomputes it
    (one GEMM per layer); ``checkpoint``: recompute each block (encoder/decoder layer) in backward.
    """
    if attention not in ATTENTION_MODES:
        raise LrcError(f"memory: attention={attention!r} is not one of {', '.join(map(repr, ATTENTION_MODES))}")
    passes = []
    if attention is not None:
        passes.append(Pass("lean_attention", lambda g: lean_attention(g, attention == "recompute", mask), inplace=False))
    if dropout:
        passes.append(Pass("lean_dropout", lean_dropout, inplace=False))
    if ffn:
        passes.append(Pass("lean_ffn", lean_ffn, inplace=False))
    if checkpoint:
        passes.append(Pass("checkpoint_blocks", checkpoint_blocks, inplace=False))
    return Pipeline("memory", passes)
