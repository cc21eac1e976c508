"""Lowering: each LoRA adapter call → one fused kernel with a hand-written backward.

``adapter(x, W, b)`` → ``LoweredLoRA(adapter)(x, W, b)`` (``lowerings/kernels.py``): base GEMM and
∂x through oneDNN, ∂A in the fast GEMM layout, the A-branch ∂x accumulated into the base ∂x in place.
The adapter module is shared, not copied (parameters, merge state and ``passthrough`` are the
adapter's own). Lowered: adapters whose forward is LoRA's own (lora, lora_plus, lora_fa, loraga,
delta_lora, lora_pro, lorasc) without adapter dropout; anything else keeps its adapter call. Run on a
copy that shares the parameters (``backends/torch_compile.lower``).
"""

from __future__ import annotations

from torch import fx, nn

from lowrank_compiler.ir import META_KEY, adapter_sites, finalize, fresh_name
from lowrank_compiler.lowerings.kernels import LoweredLoRA
from lowrank_compiler.methods.lora import LoRA
from lowrank_compiler.passes.manager import PassResult


def lowerable(ad: nn.Module) -> bool:
    """LoRA's own forward and no adapter dropout."""
    return isinstance(ad, LoRA) and type(ad).forward is LoRA.forward and isinstance(ad.lora_dropout, nn.Identity)


def lower_lora(gm: fx.GraphModule) -> PassResult:
    """Every lowerable adapter node → a call of a :class:`LoweredLoRA` holding that adapter (in place)."""
    n = 0
    for node, _mark, ad in adapter_sites(gm):
        if not lowerable(ad):
            continue
        name = fresh_name(gm, "lrc_lowered_lora")
        gm.add_module(name, LoweredLoRA(ad))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, node.args, dict(node.kwargs))
        new.meta.update({k: v for k, v in node.meta.items() if k != META_KEY})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n += 1
    if n:
        finalize(gm)
    return PassResult(gm, bool(n))
