"""LoRA-FA: LoRA with A frozen and B's gradient projected (v2, as PEFT's optimizer); the rule as a mixin."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_compiler.methods.base import SiteInfo, StepContext, register_method
from lowrank_compiler.methods.lora import LORA_ARGS, LoRA


class FrozenAProjection:
    """LoRA-FA's rule for any adapter with ``lora_A``, ``lora_B``, ``r`` and ``scaling``: A frozen, B's
    gradient projected, ``ĝ_B = (1/s²) · g_B · pinv(A Aᵀ + 1e-8 I)`` (fp32, cached while A is unchanged).
    Mixed into :class:`LoRAFA` and ``dora_fa`` (methods/dora_fa.py); call :meth:`freeze_a` in ``__init__``."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    scaling: float

    def freeze_a(self) -> None:
        self.lora_A.requires_grad_(False)
        self._inv: tuple[int, torch.Tensor] | None = None

    def _aat_inv(self) -> torch.Tensor:
        version = self.lora_A._version
        if self._inv is None or self._inv[0] != version:
            a = self.lora_A.detach().float()
            eye = torch.eye(self.r, device=a.device)
            self._inv = (version, torch.linalg.pinv(a @ a.T + 1e-8 * eye))
        return self._inv[1]

    def transform_grads(self, weight: torch.Tensor, ctx: StepContext) -> None:
        g = self.lora_B.grad
        if g is None:
            return
        proj = (g.float() @ self._aat_inv()) / self.scaling**2
        g.copy_(proj.to(g.dtype))


@register_method
class LoRAFA(FrozenAProjection, LoRA):
    """LoRA-FA: Memory-efficient Low-rank Adaptation (Zhang et al. 2023, arXiv:2308.03303).

    ``y = W x + s·B A x`` with A frozen after its LoRA init (so only the r-dim ``A x`` is kept for
    backward) and B trained. Gradient transform (PEFT ``create_lorafa_optimizer``, "v2"):
    ``ĝ_B = (1/s²) · g_B · pinv(A Aᵀ + 1e-8 I)`` — the B step whose equivalent full gradient is
    closest to G — then the base optimizer (AdamW in the paper) steps B. (AAᵀ)⁻¹ is cached since A is
    frozen. Choice: the projection runs in fp32 (PEFT runs it under bf16 autocast when available).

    Args:
        r (int, 8), alpha (float, 8), dropout (float, 0.0), rslora (bool, false): as LoRA.

    Raises:
        SpecError: an argument out of range.
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)
    name = "lora_fa"
    args = LORA_ARGS

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.freeze_a()
