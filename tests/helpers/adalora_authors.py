"""The AdaLoRA authors' training loop, re-written here as a reference for lrc's schedule.

Origin: QingruZhang/AdaLoRA, ``loralib/loralib/adalora.py`` (``SVDLinear``, ``RankAllocator``,
``compute_orth_regu``; MIT) and ``NLU/src/transformers/trainer.py`` (the loop: loss + regulariser,
backward, clip, ``optimizer.step()``, ``rankallocator.update_and_mask(model, global_step)`` with
``global_step`` from 0, incremented after the call). Re-expressed in our words, same arithmetic:
sensitivity |p·∇p|, EMAs, triplet score λ + mean Q row + mean P column, cubic budget, ``kthvalue``
threshold with ``<=`` masking, scores frozen from ``total_step − final_warmup`` on.
"""

from __future__ import annotations

import torch
from torch import nn


class SVDLinear(nn.Module):
    """y = W x + b + (x (Q ∘ λ)ᵀ Pᵀ) · alpha / (ranknum + 1e-5)  (the authors' scale)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.02)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.alpha / (self.r + 1e-5)


def orth_regu(model: nn.Module, weight: float) -> torch.Tensor:
    """weight · mean over all lora_A / lora_B matrices of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F."""
    terms = []
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])))
    return weight * sum(terms) / len(terms)


class Allocator:
    """The authors' RankAllocator (update_and_mask) over a model's SVDLinear layers."""

    def __init__(self, model: nn.Module, r: int, target_r: int, tinit: int, tfinal: int, delta_t: int,
                 total: int, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.model, self.tinit, self.tfinal, self.delta_t, self.total = model, tinit, tfinal, delta_t, total
        self.b1, self.b2 = beta1, beta2
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}
        self.b0 = sum(m.r for m in self.layers.values())
        self.bT = target_r * len(self.layers)
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    def schedule(self, t: int) -> tuple[int, bool]:
        if t <= self.tinit:
            return self.b0, False
        if t > self.total - self.tfinal:
            return self.bT, True
        frac = 1 - (t - self.tinit) / (self.total - self.tfinal - self.tinit)
        return int(self.bT + (self.b0 - self.bT) * frac ** 3), t % self.delta_t == 0

    @torch.no_grad()
    def _scores(self) -> None:
        for n, p in self.model.named_parameters():
            if "lora_" not in n:
                continue
            s = (p * p.grad).abs()
            self.avg[n] = self.b1 * self.avg.get(n, torch.zeros_like(p)) + (1 - self.b1) * s
            self.unc[n] = self.b2 * self.unc.get(n, torch.zeros_like(p)) + (1 - self.b2) * (s - self.avg[n]).abs()

    @torch.no_grad()
    def _mask(self, budget: int) -> None:
        score = {}
        for name in self.layers:
            s = {w: self.avg[f"{name}.lora_{w}"] * self.unc[f"{name}.lora_{w}"] for w in "AEB"}
            score[name] = s["E"].view(-1) + s["A"].mean(dim=1) + s["B"].mean(dim=0)
        thr = torch.kthvalue(torch.cat(list(score.values())), self.b0 - budget)[0].item()
        for name, m in self.layers.items():
            m.lora_E.masked_fill_(score[name].view(-1, 1) <= thr, 0.0)

    def update_and_mask(self, t: int) -> tuple[int, bool]:
        if t < self.total - self.tfinal:
            self._scores()
        budget, now = self.schedule(t)
        if now:
            self._mask(budget)
        return budget, now


def svd_mlp(mlp: nn.Module, sites: tuple[str, ...], r: int, alpha: float) -> nn.Module:
    """``mlp`` with each named linear wrapped in an SVDLinear (in place)."""
    for s in sites:
        setattr(mlp, s, SVDLinear(getattr(mlp, s), r, alpha))
    return mlp

