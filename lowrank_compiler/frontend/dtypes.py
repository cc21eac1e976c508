"""Changing a traced model's floating dtype (``gm.to(torch.bfloat16)``, ``gm.half()``).

``torch.export`` bakes the trace's dtypes into the graph (casts such as an RMSNorm's ``.to(float32)`` and back,
``_assert_tensor_metadata`` checks), so such a graph cannot follow its weights to another dtype; an fx-traced or
dtype-free graph can. :func:`dtype_change` tells which dtype a module conversion goes to, :func:`baked_dtypes`
whether the graph could follow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx


def dtype_change(fn: Callable[[torch.Tensor], torch.Tensor], current: torch.dtype) -> torch.dtype | None:
    """The floating dtype ``nn.Module._apply(fn)`` converts ``current`` tensors to, or None when it keeps it."""
    try:
        out = fn(torch.empty(0, dtype=current))
    except Exception:  # noqa: BLE001 - a conversion that cannot run on a probe is not a dtype change
        return None
    dt = getattr(out, "dtype", current)
    return dt if dt != current and dt.is_floating_point else None


def baked_dtypes(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes whose arguments fix a floating dtype (they would not follow a conversion)."""
    out = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method") and any(
                isinstance(a, torch.dtype) and a.is_floating_point for a in (*n.args, *n.kwargs.values())):
            out.append(n.name)
    return out
