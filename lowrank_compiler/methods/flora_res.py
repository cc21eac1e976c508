"""FLoRA, residual variant: W ∘ (1 + AᵀB), lrc's form before issue 24 (kept by name)."""

from __future__ import annotations

from lowrank_compiler.methods.base import register_method
from lowrank_compiler.methods.flora import FLoRA


@register_method
class FLoRARes(FLoRA):
    """FLoRA with a fixed all-ones pair: row i with adapter k uses ``W ∘ (1 + A_kᵀ B_k)``, i.e.
    ``y_i = W x_i + b + Σ_{j<r} a_{k,j} ⊙ (W (b_{k,j} ⊙ x_i))``.

    Why it is kept: it is the paper's form at rank r + 1 with pair 0 frozen at (1, 1), so the base path
    ``W x`` can never be scaled away, and it starts at the base with plain LoRA-style init (outer vectors
    0, inner ~ N(1, ``init_std``)) — a FLoRA adapter as a residual on the base, like LoRA. Until issue
    24 this was lrc's ``flora``; files saved then name ``flora`` and now load as the paper form (no
    migration: edit the manifest's method to ``flora_res``). Costs: one more input per row through the
    matmul with W, and on the first step the inner vectors get zero gradient (every outer vector is 0).

    Args:
        r (int, 4): trainable pairs per adapter (the paper's rank r + 1).
        n_adapters (int, 1), init_std (float, 0.1): as ``flora``.
    """

    name = "flora_res"
    ones_term = True
