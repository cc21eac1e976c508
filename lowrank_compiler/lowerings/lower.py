"""``lower(gm, goal=...)``: the one entry point of the training lowerings, speed and memory on one graph.

Every lowering returns a new GraphModule that shares all of ``gm``'s modules, parameters and buffers (nothing
is copied): train through the result, build the optimizer, save, merge and export from ``gm``.

| goal     | passes (in order)                                                        | docs            |
|----------|--------------------------------------------------------------------------|-----------------|
| "speed"  | fuse_siblings (opt-in), fast_lora, fast_linear, fast_dropout             | docs/speed.md   |
| "memory" | lean_attention, lean_dropout, lean_ffn (opt-in), checkpoint_blocks (opt-in) | docs/memory.md |
| "both"   | the memory passes, then the speed passes                                 |                 |

"both" runs memory first: the speed passes leave the memory kernels alone (they rewrite only adapters,
``aten.linear`` and plain dropout modules), while the reverse order would hand lean_attention a graph whose
attention dropout is already a speed kernel.
"""

from __future__ import annotations

from torch import fx

from lowrank_compiler.errors import ExportError, LrcError
from lowrank_compiler.ir import shared_copy
from lowrank_compiler.lowerings.checkpoint_blocks import checkpoint_blocks
from lowrank_compiler.lowerings.fast_dropout import lower_dropout
from lowrank_compiler.lowerings.fast_linear import lower_linear
from lowrank_compiler.lowerings.fast_lora import lower_lora
from lowrank_compiler.lowerings.fuse_siblings import fuse_siblings
from lowrank_compiler.lowerings.lean_attention import lean_attention
from lowrank_compiler.lowerings.lean_dropout import lean_dropout
from lowrank_compiler.lowerings.lean_ffn import lean_ffn
from lowrank_compiler.passes.manager import Pass, Pipeline

#: the speed lowerings in the order they run, by name (``lower(gm, skip=...)`` leaves some out)
LOWERINGS = ("lora", "linear", "dropout")
ATTENTION_MODES = ("recompute", "probs", None)
GOALS = ("speed", "memory", "both")


def lowering_pipeline(skip: tuple[str, ...] = (), fuse: bool = False) -> Pipeline:
    """The speed passes of :func:`lower` (minus ``skip``; ``fuse`` adds fuse_siblings first), as a pipeline."""
    bad = sorted(set(skip) - set(LOWERINGS))
    if bad:
        raise ExportError(f"unknown lowering(s) {bad}; valid: {', '.join(LOWERINGS)}")
    fns = {"lora": lower_lora, "linear": lower_linear, "dropout": lower_dropout}
    passes = [Pass("fuse_siblings", fuse_siblings, inplace=False)] if fuse else []
    return Pipeline("lower", passes + [Pass(f"lower_{n}", fns[n]) for n in LOWERINGS if n not in skip])


def memory_pipeline(attention: str | None = "recompute", mask: str = "bool", dropout: bool = True,
                    ffn: bool = False, checkpoint: bool = False) -> Pipeline:
    """The memory passes of :func:`lower` (each returns a new graph over the same parameters; docs/memory.md).

    ``attention``: "recompute" (dropout attention saves q, k, v and a mask), "probs" (saves the softmax
    output and a mask, no recompute) or None; ``mask``: "bool" or "rng"; ``dropout``: hidden dropouts save a
    bool mask, not the float noise; ``ffn``: gelu(frozen linear) keeps the linear's input and recomputes it
    (one GEMM per layer); ``checkpoint``: recompute each block (encoder/decoder layer) in backward.
    """
    if attention not in ATTENTION_MODES:
        raise LrcError(f"lower: attention={attention!r} is not one of {', '.join(map(repr, ATTENTION_MODES))}")
    if mask not in ("bool", "rng"):
        raise LrcError(f"lower: mask={mask!r} is not one of 'bool', 'rng'")
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


def lower(gm: fx.GraphModule, goal: str = "speed", *, skip: tuple[str, ...] = (), fuse_siblings: bool = False,
          attention: str | None = "recompute", mask: str = "bool", dropout: bool = True, ffn: bool = False,
          checkpoint: bool = False) -> fx.GraphModule:
    """A training graph that shares every parameter and module of ``gm`` (``gm`` is untouched).

    ``goal="speed"``: LoRA adapters as one kernel with a hand-written backward, the other linears through
    oneDNN, cheaper dropout masks (``skip`` names some of "lora", "linear", "dropout" to leave out;
    ``fuse_siblings=True`` first fuses LoRA sites that share an input). The dropout masks come from a
    different random stream than torch's, so outputs in train mode differ from ``gm``'s draw by draw.
    ``goal="memory"``: outputs and gradients equal ``gm``'s under the same RNG state; saves less for
    backward (options ``attention``, ``mask``, ``dropout``, ``ffn``, ``checkpoint``: :func:`memory_pipeline`).
    ``goal="both"``: memory, then speed. The result serves every call ``gm`` serves (``labels=``,
    ``generate``'s decode steps): a signature ``gm`` traces on first use is lowered the same way.

    Raises:
        ExportError: ``gm`` is not a GraphModule, or ``skip`` names an unknown lowering.
        LrcError: an unknown goal or memory option.
    """
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"lower() needs a GraphModule (from lrc.transform/lrc.load), got {type(gm).__name__}")
    if goal not in GOALS:
        raise LrcError(f"lower: goal={goal!r} is not one of {', '.join(map(repr, GOALS))}")
    out = gm
    if goal in ("memory", "both"):
        out = memory_pipeline(attention, mask, dropout, ffn, checkpoint)(out).gm
    if goal in ("speed", "both"):
        out = lowering_pipeline(tuple(skip), fuse_siblings)(shared_copy(out) if out is gm else out).gm
    elif out is gm:
        out = shared_copy(gm)
    if getattr(gm, "lrc_face", None) is not None:  # every call gm serves: other signatures' graphs lowered on first use
        out = gm.lrc_derive(out, lambda g: lower(g, goal, skip=skip, fuse_siblings=fuse_siblings,
                                                   attention=attention, mask=mask, dropout=dropout, ffn=ffn,
                                                   checkpoint=checkpoint))
    return out
