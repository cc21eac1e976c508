"""Find the linear sites of a GraphModule, each named by the module path that owns its weight."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowrank_compiler.ir import get_attr_tensor
from lowrank_compiler.methods.base import SiteInfo

_aten = torch.ops.aten
_LINEAR_FNS = {_aten.linear.default, F.linear, torch._C._nn.linear}
_ADDMM_FNS = {_aten.addmm.default, torch.addmm}
_T_FNS = {_aten.t.default, torch.t}
_MM_FNS = {_aten.mm.default, torch.mm, torch.matmul, operator.matmul}


@dataclass
class Site:
    """One linear ``y = x Wᵀ + b`` in the graph.

    ``layout`` is ``"linear"`` (W stored d_out × d_in) or ``"conv1d"`` (stored d_in × d_out, as HF
    Conv1D / ``x @ W``). ``refused`` says why the site cannot be adapted (None when it can).
    """

    name: str
    node: fx.Node
    kind: str  # "function" | "module"
    layout: str
    weight_path: str
    bias_path: str | None
    d_in: int
    d_out: int
    dtype: torch.dtype
    refused: str | None = None

    def info(self) -> SiteInfo:
        return SiteInfo(self.name, self.d_in, self.d_out, self.dtype, self.bias_path is not None,
                        {"layout": self.layout})


def site_name(weight_path: str) -> str:
    """``encoder.layer.0.attention.self.query.weight`` → ``encoder.layer.0.attention.self.query``."""
    return weight_path[: -len(".weight")] if weight_path.endswith(".weight") else weight_path


def _param(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    t = get_attr_tensor(gm, node)
    return t if isinstance(t, nn.Parameter) else None


def _site_of(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    if node.op == "call_function":
        tgt = node.target
        if tgt in _LINEAR_FNS and len(node.args) >= 2:
            wnode, layout = node.args[1], "linear"
            if isinstance(wnode, fx.Node) and wnode.target in _T_FNS and len(wnode.users) == 1:
                wnode, layout = wnode.args[0], "conv1d"  # linear(x, t(W)): a Conv1D-layout weight
            w = _param(gm, wnode)
            if w is None or w.dim() != 2:
                return None
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bpath = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
            if b is not None and bpath is None:
                return None
            d_out, d_in = w.shape if layout == "linear" else w.shape[::-1]
            return Site(site_name(wnode.target), node, "function", layout, wnode.target, bpath, d_in, d_out, w.dtype)
        if tgt in _ADDMM_FNS and len(node.args) == 3 and not node.kwargs:
            w, b = _param(gm, node.args[2]), get_attr_tensor(gm, node.args[0])
            if w is None or w.dim() != 2 or b is None or b.dim() != 1:
                return None
            return Site(site_name(node.args[2].target), node, "function", "conv1d", node.args[2].target,
                        node.args[0].target, w.shape[0], w.shape[1], w.dtype)
        if tgt in _MM_FNS and len(node.args) == 2 and not node.kwargs:
            w = _param(gm, node.args[1])
            if w is None or w.dim() != 2:
                return None
            return Site(site_name(node.args[1].target), node, "function", "conv1d", node.args[1].target, None,
                        w.shape[0], w.shape[1], w.dtype)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        layout = "linear" if isinstance(mod, nn.Linear) else "conv1d" if type(mod).__name__ == "Conv1D" else None
        if layout is None or len(node.args) != 1 or node.kwargs:
            return None
        w = mod.weight
        d_in, d_out = (w.shape[1], w.shape[0]) if layout == "linear" else (w.shape[0], w.shape[1])
        bias = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
        return Site(node.target, node, "module", layout, f"{node.target}.weight", bias, d_in, d_out, w.dtype)
    return None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every linear site in graph order; a weight used by two nodes marks the later one refused."""
    sites: list[Site] = []
    seen: dict[str, Site] = {}
    users: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            users.setdefault(node.target, []).extend(node.users)
    for node in gm.graph.nodes:
        site = _site_of(gm, node)
        if site is None:
            continue
        other = [u for u in users.get(site.weight_path, ()) if u is not node and node not in u.users]
        if site.weight_path in seen:
            site.refused = f"weight {site.weight_path} is shared with node {seen[site.weight_path].node.name} (tied)"
        elif other and site.kind == "function":
            site.refused = (f"weight {site.weight_path} is tied to another use ({other[0].name}, e.g. the input "
                            "embedding); an adapter would be folded into both on merge")
            seen[site.weight_path] = site
        else:
            seen[site.weight_path] = site
        sites.append(site)
    return sites
