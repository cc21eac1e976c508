"""Horizontal fusion of sibling LoRA sites: one GEMM for the stacked base weights, one for the stacked A's.

Sibling sites read the same input node (BERT's query/key/value, Llama's q/k/v_proj, gate/up_proj). For a
group of n LoRA adapters on input x the fused module computes, with x flattened to (N, d_in):
    out = x [W_1; ...; W_n]ᵀ + [b_1; ...; b_n]          one (N, d_in) × (d_in, Σ d_out) GEMM
    h   = x [A_1; ...; A_n]ᵀ                            one (N, d_in) × (d_in, Σ r) GEMM
    out += h · blockdiag(s_1 B_1, ..., s_n B_n)ᵀ        one in-place GEMM (addmm_)
    y_i = out[:, slice_i]                               views, no copy

instead of 3n GEMMs. Backward follows: ∂x is one (N, Σ d_out) × (Σ d_out, d_in) GEMM plus one for the
A branch instead of 2n GEMMs and n − 1 additions; ∂A and ∂B come from one GEMM each.

This is a *lowering*: the result is a new GraphModule for training/inference that shares every
module, parameter and buffer with ``gm`` (the owning submodules are the same objects, so a base weight
that a method replaces later, or ``merge_adapters``, is seen by both). Build the optimizer, save and
export from ``gm``; run the steps through the fused graph. Adapters that are merged or bypassed at run
time contribute no branch. Fused: adapters whose forward is LoRA's own (lora, lora_plus, lora_fa,
loraga, delta_lora, lora_pro, lorasc) with no dropout, the same input node, dtype and d_in.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowrank_compiler.ir import META_KEY, AdapterMark, adapter_nodes, fresh_name, shared_copy
from lowrank_compiler.methods.lora import LoRA
from lowrank_compiler.passes.manager import PassResult


class FusedLoRA(nn.Module):
    """n sibling LoRA adapters (shared, not copied) evaluated with three GEMMs; returns a tuple of n outputs."""

    def __init__(self, adapters: list[LoRA]) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.d_outs = [int(a.d_out) for a in adapters]

    def forward(self, x: torch.Tensor, *weights_and_biases: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        n = len(self.d_outs)
        weights, biases = weights_and_biases[:n], weights_and_biases[n:]
        x2 = x.reshape(-1, x.shape[-1])
        w = torch.cat(weights, 0)
        b = None
        if any(t is not None for t in biases):
            b = torch.cat([t if t is not None else w.new_zeros(d) for t, d in zip(biases, self.d_outs)])
        out = F.linear(x2, w, b)
        live = [a for a in self.adapters if not a.passthrough]
        if live:
            a_cat = torch.cat([a.lora_A for a in self.adapters], 0)
            blocks = [a.lora_B * a.scaling if not a.passthrough else torch.zeros_like(a.lora_B) for a in self.adapters]
            h = F.linear(x2, a_cat)
            out.addmm_(h, torch.block_diag(*blocks).t())
        lead = x.shape[:-1]
        return tuple(y.view(*lead, d) for y, d in zip(out.split(self.d_outs, dim=1), self.d_outs))


def _fusable(ad: nn.Module, x: fx.Node) -> bool:
    return (isinstance(ad, LoRA) and type(ad).forward is LoRA.forward
            and isinstance(ad.lora_dropout, nn.Identity) and isinstance(x, fx.Node))


def sibling_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Adapter nodes grouped by their input node (only groups of 2+ fusable LoRA adapters)."""
    groups: dict[tuple[fx.Node, Any, int], list[fx.Node]] = {}
    for node in adapter_nodes(gm):
        mark: AdapterMark = node.meta[META_KEY]
        ad = gm.get_submodule(mark.module_path)
        x = node.args[0]
        if _fusable(ad, x):
            groups.setdefault((x, ad.lora_A.dtype, int(ad.d_in)), []).append(node)
    return [g for g in groups.values() if len(g) > 1]


def fuse_siblings(gm: fx.GraphModule) -> PassResult:
    """A fused training/inference graph sharing ``gm``'s parameters (``modified=False``: ``gm`` itself)."""
    if not sibling_groups(gm):
        return PassResult(gm, False)
    new = shared_copy(gm)
    graph = new.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for group in sibling_groups(new):
        mods = [new.get_submodule(n.meta[META_KEY].module_path) for n in group]
        name = fresh_name(new, "lrc_fused_lora")
        new.add_module(name, FusedLoRA(mods))
        first = min(group, key=order.__getitem__)
        weights = [n.args[1] for n in group]
        biases = [n.args[2] if len(n.args) > 2 else None for n in group]
        for arg in weights + biases:  # weight/bias getters (no inputs) move up before the fused call
            if isinstance(arg, fx.Node) and order[arg] > order[first]:
                if arg.all_input_nodes:
                    break
                first.prepend(arg)
        else:
            with graph.inserting_before(first):
                fused = graph.call_module(name, (group[0].args[0], *weights, *biases))
                outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(len(group))]
            for node, out in zip(group, outs):
                out.meta = {k: v for k, v in node.meta.items() if k != META_KEY}
                node.replace_all_uses_with(out)
                graph.erase_node(node)
            order = {n: i for i, n in enumerate(graph.nodes)}
    graph.lint()
    new.recompile()
    return PassResult(new, True)
