"""Separate: LoRA-family adapters → explicit ``(x @ A_in) @ B_out`` branches in ONNX layout; DoRA-family
adapters also get a per-output-channel gain: ``g ⊙ (W x + (x @ A_in) @ B_out) + b``."""

from __future__ import annotations

import torch
from torch import fx, nn

from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import (
    META_KEY,
    AdapterMark,
    adapter_nodes,
    delete_submodule,
    finalize,
    frozen_shared_copy,
    logical_weight,
    set_logical_weight,
)
from lowrank_compiler.methods.base import AdapterMethod
from lowrank_compiler.passes.manager import PassResult

_aten = torch.ops.aten
LORA_A, LORA_B, GAIN = "lora_A", "lora_B", "dora_gain"


def onnx_lora_tensors(method: AdapterMethod) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A_in, B_out)`` = ``(Aᵀ, s·Bᵀ)`` of ``method.low_rank_factors()`` (shapes [d_in, r], [r, d_out],
    so ``Δy = (x @ A_in) @ B_out``), or None for a method without a low-rank form."""
    f = method.low_rank_factors()
    if f is None:
        return None
    a = f.A.detach().t().contiguous()
    b = (f.B.detach().float() * f.scale).t().to(f.B.dtype).contiguous()
    return a, b


def onnx_adapter_tensors(method: AdapterMethod, weight: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(A_in, B_out, gain)`` of ``method`` over the (unmerged) base ``weight``: a low-rank method's pair
    with gain None, or a gain method's (DoRA, DoRA-FA: ``Δ`` as :class:`MixedFactors`, eval mode) pair
    with ``gain`` [d_out] = m / ‖W + s·B A‖ (fixed once the weights are); None for any other method."""
    pair = onnx_lora_tensors(method)
    if pair is not None:
        return (*pair, None)
    f = method.mixed_factors(weight)
    if f is None or f.gain is None:
        return None
    return (f.A.detach().t().contiguous(), f.B.detach().t().contiguous(), f.gain.detach().contiguous())


class SeparateLoRA(nn.Module):
    """Holds one site's LoRA pair in ONNX/Olive layout (``lora_A`` [d_in, r], ``lora_B`` [r, d_out]) and,
    at a gain site, ``dora_gain`` [d_out]."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, gain: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(a, requires_grad=False)
        self.lora_B = nn.Parameter(b, requires_grad=False)
        if gain is not None:
            self.dora_gain = nn.Parameter(gain, requires_grad=False)


def separate(gm: fx.GraphModule, placeholder_seed: int | None = None,
             gain_sites: frozenset[str] | set[str] = frozenset()) -> PassResult:
    """A copy of ``gm`` where each LoRA adapter is an explicit branch over ONNX-layout parameters; the copy
    shares ``gm``'s frozen tensors (no pass writes a tensor in place: a rewritten base weight is a new one).

    Cases:
      1. adapter node ``adapter(x, W, b)`` whose method has ``low_rank_factors()`` →
         ``linear(x, W, b) + matmul(matmul(x, <site>.adapter.lora_A), <site>.adapter.lora_B)``.
         A merged adapter is unmerged first (on the copy), so ``W`` is the base weight.
      2. a gain method (DoRA, DoRA-FA), or any site in ``gain_sites`` →
         ``(linear(x, W) + matmul(matmul(x, lora_A), lora_B)) * dora_gain + b``; ``dora_gain`` is
         m / ‖W + s·B A‖ for DoRA and ones for a low-rank method (so a shared graph serves both).
    ``placeholder_seed``: fill A/B with distinct random values instead of the adapter's (the
    dynamo exporter merges identical initializers, e.g. every zero-init B, into one).
    A graph without adapters is returned as a copy with ``modified=False``.

    Raises:
        ExportError: an adapter's method has neither form (e.g. FLoRA); merge instead.
    """
    out = frozen_shared_copy(gm)  # a 1.1B export at +0.1 W instead of +1.1 W (docs/scale.md)
    nodes = adapter_nodes(out)
    bad = [(n.meta[META_KEY].site, n.meta[META_KEY].method) for n in nodes
           if _tensors(out, n) is None]
    if bad:
        raise ExportError(
            f"separate adapters need a low-rank method (y = Wx + s·B·A·x, or DoRA's g ⊙ (Wx + s·B·A·x)); "
            f"these sites use others: "
            f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; export with merge=True (`--merge`) instead")
    gen = torch.Generator().manual_seed(placeholder_seed) if placeholder_seed is not None else None
    for node in nodes:
        _try_rewrite(out, node, gen, node.meta[META_KEY].site in gain_sites)
    if nodes:
        finalize(out)
    return PassResult(out, bool(nodes))


def _tensors(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """:func:`onnx_adapter_tensors` of ``node``'s adapter over its unmerged base weight."""
    mark: AdapterMark = node.meta[META_KEY]
    method: AdapterMethod = gm.get_submodule(mark.module_path)
    w = logical_weight(gm, mark)
    if method.merged:
        w = method.unmerged_weight(w)
    return onnx_adapter_tensors(method, w)


def _try_rewrite(gm: fx.GraphModule, node: fx.Node, gen: torch.Generator | None, want_gain: bool) -> bool:
    mark: AdapterMark = node.meta[META_KEY]
    method: AdapterMethod = gm.get_submodule(mark.module_path)
    with torch.no_grad():
        a, b, gain = _tensors(gm, node)
    if method.merged:
        with torch.no_grad():
            set_logical_weight(gm, mark, method.unmerged_weight(logical_weight(gm, mark)))
        method.merged = False
    if gain is None and want_gain:
        gain = torch.ones(b.shape[1])
    if gain is not None:
        gain = gain.to(logical_weight(gm, mark).dtype)
    if gen is not None:
        a = torch.rand(a.shape, generator=gen).to(a.dtype) + 0.5
        b = torch.rand(b.shape, generator=gen).to(b.dtype) + 0.5
        gain = None if gain is None else torch.rand(gain.shape, generator=gen).to(gain.dtype) + 0.5
    delete_submodule(gm, mark.module_path)
    gm.add_submodule(mark.module_path, SeparateLoRA(a, b, gain))
    x, w, bias = node.args
    g = gm.graph
    with g.inserting_before(node):
        lin = g.call_function(_aten.linear.default, (x, w, bias) if bias is not None and gain is None else (x, w))
        pa = g.get_attr(f"{mark.module_path}.{LORA_A}")
        pb = g.get_attr(f"{mark.module_path}.{LORA_B}")
        base_dtype = logical_weight(gm, mark).dtype
        x_dtype = _dtype_of(x) or base_dtype
        if a.dtype != x_dtype:  # e.g. LoRA-GA keeps fp32 factors on a bf16 model
            x = g.call_function(_aten._to_copy.default, (x,), {"dtype": a.dtype})
        h = g.call_function(_aten.matmul.default, (x, pa))
        d = g.call_function(_aten.matmul.default, (h, pb))
        y = g.call_function(_aten.add.Tensor, (lin, d))
        if a.dtype != x_dtype:  # the sum in the factors' dtype, rounded once to the activation dtype (LoRA.forward)
            y = g.call_function(_aten._to_copy.default, (y,), {"dtype": x_dtype})
        if gain is not None:  # g ⊙ (W x + Δ) + b: the bias is outside the gain, as DoRA's forward
            y = g.call_function(_aten.mul.Tensor, (y, g.get_attr(f"{mark.module_path}.{GAIN}")))
            if bias is not None:
                y = g.call_function(_aten.add.Tensor, (y, bias))
    lin.meta.update({k: v for k, v in node.meta.items() if k != META_KEY})
    y.meta["lrc_separate"] = mark.site
    node.replace_all_uses_with(y)
    g.erase_node(node)
    return True


def _dtype_of(x: object) -> torch.dtype | None:
    val = getattr(x, "meta", {}).get("val") if isinstance(x, fx.Node) else None
    return getattr(val, "dtype", None)
