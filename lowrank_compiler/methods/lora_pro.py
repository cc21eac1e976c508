"""LoRA-Pro: LoRA with gradients adjusted so the equivalent full gradient is closest to G."""

from __future__ import annotations

import math
from typing import Any

import torch

from lowrank_compiler.errors import LrcError
from lowrank_compiler.methods.args import Arg, one_of
from lowrank_compiler.methods.base import SiteInfo, StepContext, register_method
from lowrank_compiler.methods.lora import LORA_ARGS, LoRA

_DELTA = 1e-8  # ridge on the r × r inverses, as the authors (pinv(M + 1e-8 I))


def solve_sylvester_sym(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with ``P X + X Q = C`` for symmetric PSD P, Q (eigendecomposition, fp32)."""
    a, u = torch.linalg.eigh(p)
    b, v = torch.linalg.eigh(q)
    denom = a.unsqueeze(1) + b.unsqueeze(0)
    denom = torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
    return u @ ((u.T @ c @ v) / denom) @ v.T


def adjusted_grads(
    a: torch.Tensor, b: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor, s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's (g_A, g_B) from LoRA's gradients (all fp32), per ALGORITHMS.md.

    g_A = (1/s²)(BᵀB)⁻¹ g_A^lora + X A;  g_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B^lora (AAᵀ)⁻¹ − B X,
    X solving (BᵀB)X + X(AAᵀ) = −(1/s²)(BᵀB)⁻¹ g_A^lora Aᵀ. Then s(B g_A + g_B A) is the
    projection of G onto {B U + V A}: P_B G + G P_A − P_B G P_A.
    """
    eye = torch.eye(a.shape[0], device=a.device)
    btb, aat = b.T @ b, a @ a.T
    btb_inv = torch.linalg.pinv(btb + _DELTA * eye)
    aat_inv = torch.linalg.pinv(aat + _DELTA * eye)
    x = solve_sylvester_sym(btb, aat, -(btb_inv @ g_a @ a.T) / s**2)
    new_a = (btb_inv @ g_a) / s**2 + x @ a
    new_b = ((g_b - b @ (btb_inv @ (b.T @ g_b))) @ aat_inv) / s**2 - b @ x
    return new_a, new_b


@register_method
class LoRAPro(LoRA):
    """LoRA-Pro: Are Low-Rank Adapters Properly Optimized? (Wang, Liang 2024, arXiv:2407.18242).

    Forward/init/merge as LoRA. Before the optimizer step, LoRA's gradients are replaced by
    :func:`adjusted_grads` (checked against the authors' ``peta/optim.py``).
    ``mode="full"`` (default; the authors' AdamW "full" mode): Adam moments are kept on the
    equivalent gradient g̃ = s(B g_A + g_B A) (d_out × d_in, fp32, in the optimizer state of
    ``lora_B`` (``step``, ``lorapro_exp_avg``, ``lorapro_exp_avg_sq``), so it is saved with ``state_dict()``); the Adam direction
    m̂/(√v̂ + eps) is projected back with the same closed form and applied with the group's ``lr``;
    weight decay multiplies A and B by √(1 − lr·wd). The method steps A and B itself and clears
    their ``.grad`` so the base optimizer skips them; hyperparameters (lr, betas, eps, weight_decay)
    are read from the param group, so schedulers apply. Choice: the frozen base W is not decayed
    (the authors also decay W). ``mode="efficient"``: the adjusted gradients go to the base
    optimizer as they are (any optimizer). Memory of "full": 2·d_out·d_in floats per site.
    With an optimizer that keeps no Adam moments (no ``betas`` in its param group, e.g.
    ``torch.optim.SGD``), "full" does what "efficient" does: that optimizer steps the adjusted
    gradients (the authors' LoRA-Pro SGD), never a hidden Adam step.

    Args:
        r (int, 8), alpha (float, 8), dropout (float, 0.0), rslora (bool, false): as LoRA.
        mode (str, "full"): "full" or "efficient".

    Raises:
        SpecError: an argument out of range.
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)
    name = "lora_pro"
    args = {**LORA_ARGS, "mode": Arg("full", (str,), one_of("full", "efficient"), "AdamW variant")}

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.mode = kwargs["mode"]

    @torch.no_grad()
    def transform_grads(self, weight: torch.Tensor, ctx: StepContext) -> None:
        A, B = self.lora_A, self.lora_B
        if A.grad is None or B.grad is None:
            return
        if not (bool(torch.isfinite(A.grad).all()) and bool(torch.isfinite(B.grad).all())):
            raise LrcError(f"lora_pro at site {self.site_name!r}, step {ctx.step}: non-finite gradients (NaN/inf "
                           "in the batch or the loss); nothing was updated")
        a, b, s = A.float(), B.float(), self.scaling
        ga, gb = adjusted_grads(a, b, A.grad.float(), B.grad.float(), s)
        group, state = ctx.group(B), ctx.state(B)
        if self.mode == "efficient" or "betas" not in group:  # no Adam moments: the authors' SGD variant
            A.grad.copy_(ga)
            B.grad.copy_(gb)
            return
        lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
        beta1, beta2 = group.get("betas", (0.9, 0.999))
        eps = float(group.get("eps", 1e-8))
        equiv = s * (b @ ga + gb @ a)
        if "lorapro_exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)  # torch Adam expects a "step" in any state
            state["lorapro_exp_avg"] = torch.zeros_like(equiv)
            state["lorapro_exp_avg_sq"] = torch.zeros_like(equiv)
        state["step"] += 1
        t = float(state["step"])
        m, v = state["lorapro_exp_avg"], state["lorapro_exp_avg_sq"]
        m.lerp_(equiv, 1 - beta1)
        v.mul_(beta2).addcmul_(equiv, equiv, value=1 - beta2)
        direction = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(eps))
        ua, ub = adjusted_grads(a, b, s * (b.T @ direction), s * (direction @ a.T), s)
        if wd:
            shrink = math.sqrt(1 - lr * wd)
            A.mul_(shrink)
            B.mul_(shrink)
        A.sub_((lr * ua).to(A.dtype))
        B.sub_((lr * ub).to(B.dtype))
        A.grad = None
        B.grad = None
