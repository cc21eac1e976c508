"""torch.compile lowering of a transformed graph (adapters unmerged, or merged), for training and inference."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from ..errors import ExportError


def compile(gm: fx.GraphModule, *, merge: bool = False, backend: str = "inductor", mode: str | None = None,
            dynamic: bool | None = None, fullgraph: bool = True, **options: Any) -> nn.Module:
    """``torch.compile`` of ``gm`` (or of a merged copy with ``merge=True``); same call signature as ``gm``.

    Training works through the result: the adapter parameters are the graph's own, so an optimizer
    built on ``gm`` (``lrc.optimizer``) steps them; ``gm.train()``/``gm.eval()`` switch dropout
    (dynamo guards on the mode and recompiles once per mode). ``fullgraph=True`` (the default)
    makes any graph break an error: lrc adapters are plain tensor code and add none.

    Raises:
        ExportError: ``gm`` is not a module, or the backend is unknown.
    """
    if not isinstance(gm, nn.Module):
        raise ExportError(f"compile() needs a GraphModule (from lrc.transform/lrc.load), got {type(gm).__name__}")
    if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ExportError(f"unknown torch.compile backend {backend!r}; valid: "
                          f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    target = gm
    if merge:
        from ..pipelines import merge_pipeline

        target = merge_pipeline()(copy.deepcopy(gm)).gm
    return torch.compile(target, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph, **options)


def graph_breaks(gm: nn.Module, *inputs: Any, **kwargs: Any) -> list[str]:
    """The reasons ``torch._dynamo.explain`` gives for every graph break of ``gm(*inputs, **kwargs)``."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(gm)(*inputs, **kwargs)
    return [str(getattr(r, "reason", r)) for r in ex.break_reasons]
