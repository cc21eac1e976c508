"""torch.compile lowering of a transformed graph (adapters unmerged, or merged), for training and inference.

:func:`compile` compiles a graph (or its :func:`lowrank_compiler.lowerings.lower` training graph) with inductor,
forward and backward, and can make the optimizer step fused.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import shared_copy
from lowrank_compiler.lowerings import lower as _lower
from lowrank_compiler.passes.pipelines import merge_pipeline

#: the lowerings that change the dropout random stream: the default (``lower=None``) leaves them out
RANDOM_LOWERINGS = ("dropout",)


def fuse_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Switch ``optimizer`` (in place) to torch's fused single-kernel step (Adam, AdamW, SGD, Adagrad);
    any other class gets its ``step`` compiled with ``torch.compile``. Returns ``optimizer``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ExportError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)):
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = True, False
        optimizer.defaults["fused"], optimizer.defaults["foreach"] = True, False
    else:
        optimizer.step = torch.compile(optimizer.step)
    return optimizer


def compile(gm: fx.GraphModule, *, merge: bool = False, backend: str = "inductor", mode: str | None = None,
            dynamic: bool | None = None, fullgraph: bool = True, lower: bool | None = None,
            optimizer: torch.optim.Optimizer | None = None, exact_dropout: bool = True, **options: Any) -> nn.Module:
    """``torch.compile`` of ``gm`` (or of a merged copy with ``merge=True``); same calls as ``gm`` (every signature).

    Training works through the result: the adapter parameters are the graph's own, so an optimizer
    built on ``gm`` (``lrc.optimizer``) steps them; ``gm.train()``/``gm.eval()`` switch dropout
    (dynamo guards on the mode and recompiles once per mode). ``fullgraph=True`` (the default)
    makes any graph break an error: lrc adapters are plain tensor code and add none.

    The default (``lower=None``) is the fastest *exact* path (docs/speed.md): each call signature's graph gets the
    lowerings that keep torch's random stream (``lower_lora``: LoRA as one kernel; ``lower_linear``: oneDNN GEMMs),
    then inductor with ``exact_dropout=True``: dropout masks (hidden and attention) drawn by torch's own random ops
    (inductor's ``fallback_random``), so a seeded compiled step drops the same elements as the eager model and no
    per-element CPU Philox runs. ``exact_dropout=False`` gives inductor's own stream. ``generate`` on the result
    runs as on ``gm`` (eager modules with adapters where ``gm`` can), never through per-length recompiles.

    ``lower=True`` adds the dropout lowering (cheaper masks from another random stream: the fastest path, opt-in);
    ``lower=False`` compiles the graph as transformed. ``optimizer=opt`` also makes ``opt``'s step fused
    (:func:`fuse_optimizer`, in place), so one call covers forward, backward and the step.

    Raises:
        ExportError: ``gm`` is not a module, the backend is unknown, or ``lower=True`` with ``merge``.
    """
    if not isinstance(gm, nn.Module):
        raise ExportError(f"compile() needs a GraphModule (from lrc.transform/lrc.load), got {type(gm).__name__}")
    if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ExportError(f"unknown torch.compile backend {backend!r}; valid: "
                          f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    if lower and merge:
        raise ExportError("compile(lower=True) is for training; merge=True is for inference: pick one")
    if optimizer is not None:
        fuse_optimizer(optimizer)
    target = merge_pipeline()(copy.deepcopy(gm)).gm if merge else gm
    skip = None if lower is False or merge or not isinstance(gm, fx.GraphModule) else () if lower else RANDOM_LOWERINGS
    if exact_dropout and backend == "inductor":  # torch.compile takes mode or options, not both: fold mode in
        modal = torch._inductor.list_mode_options(mode) if mode is not None else {}
        options["options"] = {**modal, "fallback_random": True, **(options.get("options") or {})}
        mode = None
    opts = dict(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph, **options)

    def post(g: nn.Module) -> nn.Module:  # one signature's graph -> its (lowered) compiled module
        return _compiled(g if skip is None else _lower(g, skip=skip), opts)

    if getattr(target, "lrc_face", None) is None:
        return post(target)
    # one kind of model object: the result holds gm's own graph (so generate and anything reading the graph see
    # gm's), dispatches like gm (every call signature) and runs each signature's lowered compiled module, made on
    # its first call; dynamo never traces the dispatcher itself
    return target.lrc_derive(shared_copy(target), post, run_primary=post(shared_copy(target)))


class FlatCompiled(nn.Module):
    """``torch.compile`` of a GraphModule over flat tensors: the pytree calling convention (a ``DynamicCache`` in or
    out ...) is applied around the compiled graph, in eager, so dynamo never traces a pytree node's Python (transformers'
    cache unflatten builds the cache from a generator, which dynamo 2.13 cannot reconstruct)."""

    def __init__(self, gm: fx.GraphModule, opts: dict[str, Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_orig_mod", gm)  # what was compiled (as torch.compile's module names it), unregistered
        self.codegen = gm.graph._codegen
        flat = shared_copy(gm)
        flat.graph._codegen = fx.graph.CodeGen()
        flat.recompile()
        self.compiled = torch.compile(flat, **opts)

    def forward(self, *args: Any) -> Any:
        return self.codegen.process_outputs(self.compiled(*self.codegen.process_inputs(*args)))


def _compiled(g: nn.Module, opts: dict[str, Any]) -> nn.Module:
    if isinstance(g, fx.GraphModule) and isinstance(g.graph._codegen, fx.graph._PyTreeCodeGen):
        return FlatCompiled(g, opts)
    return torch.compile(g, **opts)


def graph_breaks(gm: nn.Module, *inputs: Any, **kwargs: Any) -> list[str]:
    """The reasons ``torch._dynamo.explain`` gives for every graph break of ``gm(*inputs, **kwargs)``."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(gm)(*inputs, **kwargs)
    return [str(getattr(r, "reason", r)) for r in ex.break_reasons]
