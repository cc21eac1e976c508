"""The IR's vocabulary: marks on nodes, graph-level records, adapter lookup and logical weights."""


from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowrank_compiler.errors import LrcError
from lowrank_compiler.methods.base import AdapterMethod, get_method

META_KEY = "lrc"
ADAPTER_ATTR = "adapter"
#: where inactive named adapters live (``<NAMED_ROOT>.<name>.<site key>``, see named.py); verify skips them
NAMED_ROOT = "lrc_adapters"
_aten = torch.ops.aten


class VerifyError(LrcError, AssertionError):
    """A graph broke one of the IR invariants (a bug in a pass, or a graph edited by hand)."""


# -- marks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteMark:
    """On a linear node the spec adapts: which rule matched and what to insert."""

    site: str
    rule: int
    method: str
    args: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        if not self.site or self.rule < 0:
            raise ValueError(f"bad SiteMark {self!r}")
        get_method(self.method)


@dataclass(frozen=True)
class AdapterMark:
    """On every adapter call_module node: the site it adapts and where its tensors live."""

    site: str
    method: str
    layout: str
    weight_path: str
    bias_path: str | None
    module_path: str

    def __post_init__(self) -> None:
        if self.layout not in ("linear", "conv1d"):
            raise ValueError(f"bad layout {self.layout!r}")


# -- graph-level metadata --------------------------------------------------------------------------
def lrc_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The GraphModule-level lrc metadata dict (created on first use)."""
    return gm.meta.setdefault(META_KEY, {})


def example_inputs(gm: fx.GraphModule) -> tuple[tuple[Any, ...], list[str]]:
    """(example inputs, input names) recorded at trace time; both empty when none were given."""
    meta = lrc_meta(gm)
    inputs = tuple(meta.get("example_inputs") or ())
    names = list(meta.get("input_names") or [f"input_{i}" for i in range(len(inputs))])
    return inputs, names


# -- adapters --------------------------------------------------------------------------------------
def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The adapter call_module nodes, in graph order (the only way code finds adapters)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(n.meta.get(META_KEY), AdapterMark)]


def adapter_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, AdapterMark, AdapterMethod]]:
    """``(node, mark, adapter module)`` for every adapter, in graph order."""
    out = []
    for n in adapter_nodes(gm):
        mark: AdapterMark = n.meta[META_KEY]
        out.append((n, mark, gm.get_submodule(mark.module_path)))
    return out


def adapters_of(gm: fx.GraphModule) -> dict[str, AdapterMethod]:
    """``{site: adapter module}`` in graph order."""
    return {mark.site: mod for _, mark, mod in adapter_sites(gm)}


def adapter_path(gm: fx.GraphModule, site: str) -> str:
    """Where a site's adapter lives: ``<site>.adapter``, or ``<site>_adapter`` when the site is a bare parameter."""
    try:
        gm.get_submodule(site)
        return f"{site}.{ADAPTER_ATTR}"
    except AttributeError:
        return f"{site}_{ADAPTER_ATTR}"


# -- base weights ----------------------------------------------------------------------------------
def logical_weight(gm: fx.GraphModule, mark: AdapterMark) -> torch.Tensor:
    """The site's base weight in d_out × d_in layout (a view for Conv1D-layout weights)."""
    w = gm.get_parameter(mark.weight_path)
    return w.t() if mark.layout == "conv1d" else w


def set_logical_weight(gm: fx.GraphModule, mark: AdapterMark, value: torch.Tensor) -> None:
    """Replace the site's base weight by ``value`` (d_out × d_in) as a NEW parameter object.

    The old tensor may be shared with the user's original model, so it is never written in place.
    """
    old = gm.get_parameter(mark.weight_path)
    stored = value.t() if mark.layout == "conv1d" else value
    new = nn.Parameter(stored.detach().to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    parent, _, leaf = mark.weight_path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)




class TrainOnlySDPA(nn.Module):
    """scaled_dot_product_attention whose attention dropout applies only in training mode.

    Inserted by ``passes/mode.py``; the lowerings that rewrite attention (``lean_attention``,
    ``lower_dropout``) recognise it by type.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        p = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )

    def extra_repr(self) -> str:
        return f"p={self.p}"
