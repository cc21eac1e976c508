"""Delta-LoRA: LoRA whose step also moves the base weight, W += ratio · s · Δ(BA)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lowrank_compiler.methods.args import Arg, non_negative, positive
from lowrank_compiler.methods.base import SiteInfo, StepContext, register_method
from lowrank_compiler.methods.lora import LoRA


@register_method
class DeltaLoRA(LoRA):
    """Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices
    (Zi et al. 2023, arXiv:2309.02411).

    Standard LoRA (init, forward, merge) without adapter dropout (the paper removes it so that
    Δ(BA) is the true change of the adapter's map). After optimizer step t > ``start``:
    ``W ← W + ratio · s · (B_{t+1} A_{t+1} − B_t A_t)`` — no gradient and no optimizer state for W.
    Choices: the update is computed in fp32 and written in the base dtype; (A_t, B_t) are snapshot in
    ``transform_grads`` (r·(d_in + d_out) floats, only for steps past ``start``). The base weight is
    no longer the original after ``start`` steps, so merge/export carry the updated W (lrc.save
    saves it); the user's original model is never written (a new Parameter is made on the first write).

    Args:
        r (int, 8), alpha (float, 8), rslora (bool, false): as LoRA.
        ratio (float, 2): λ, the multiplier of Δ(BA) added to W; > 0.
        start (int, 500): K, the number of warm-up steps before W moves.

    Raises:
        SpecError: ratio ≤ 0, start < 0, or a LoRA argument out of range.
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)
    name = "delta_lora"
    args = {
        "r": LoRA.args["r"],
        "alpha": LoRA.args["alpha"],
        "rslora": LoRA.args["rslora"],
        "ratio": Arg(2.0, (float,), positive, "multiplier of the BA delta added to W"),
        "start": Arg(500, (int,), non_negative, "steps before W is updated"),
    }
    modifies_base: ClassVar[bool] = True

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)  # no dropout argument: LoRA's branch runs without dropout
        self.ratio, self.start = float(kwargs["ratio"]), int(kwargs["start"])
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None

    def transform_grads(self, weight: torch.Tensor, ctx: StepContext) -> None:
        self._prev = (self.lora_A.detach().clone(), self.lora_B.detach().clone()) if ctx.step > self.start else None

    def after_step(self, weight: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        if self._prev is None:
            return None
        a0, b0 = self._prev
        self._prev = None
        delta = self.lora_B.float() @ self.lora_A.float() - b0.float() @ a0.float()
        return weight.float() + (self.ratio * self.scaling) * delta
