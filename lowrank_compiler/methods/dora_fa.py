"""DoRA-FA: DoRA with LoRA-FA's frozen A and projected B gradient (beyond PEFT, which crashes on it)."""

from __future__ import annotations

from typing import Any

from lowrank_compiler.methods.base import SiteInfo, register_method
from lowrank_compiler.methods.dora import DoRA
from lowrank_compiler.methods.lora_fa import FrozenAProjection


@register_method
class DoRAFA(FrozenAProjection, DoRA):
    """DoRA (Liu et al. 2024) trained the LoRA-FA way (Zhang et al. 2023).

    Why the math allows it: DoRA's weight is ``m ⊙ V/‖V‖`` with the direction ``V = W + s·B A`` and
    the norm detached, so ∂L/∂V = (m/‖V‖) ⊙ ∂L/∂W' (row scaling) and ``g_B = s·(∂L/∂V) Aᵀ`` — the
    same shape of gradient LoRA-FA projects. The projection ``ĝ_B = (1/s²)·g_B·pinv(A Aᵀ + 1e-8 I)``
    gives the B step whose update of V (``s·ΔB A``) is closest in Frobenius norm to the full
    step on V, exactly LoRA-FA's argument with V in place of W. The magnitude ``m`` trains with the
    plain gradient. A is frozen after its kaiming init, B starts at 0 and m at ‖W‖, so the output
    starts at the base's. Memory: A x (r-dim) is all the B/A branch keeps; DoRA's gain still needs
    the d_out-dim ``W x + s·B A x`` for m's gradient.

    PEFT (0.21) cannot run it: ``create_lorafa_optimizer`` pairs consecutive parameters whose names
    contain "lora", so ``lora_magnitude_vector`` is taken for a B and the step fails on a None grad.

    Args:
        r (int, 32), alpha (float, 64), dropout (float, 0.05), rslora (bool, false): as DoRA.

    Raises:
        SpecError: an argument out of range.
    """

    name = "dora_fa"

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.freeze_a()
