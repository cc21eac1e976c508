"""DoRA: weight-decomposed LoRA, W' = m ⊙ (W + sBA) / ‖W + sBA‖_row."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compiler.methods.args import Arg, positive, probability
from lowrank_compiler.methods.base import LowRank, MixedFactors, SiteInfo, check_finite, register_method
from lowrank_compiler.methods.lora import LoRA


@register_method
class DoRA(LoRA):
    """DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv:2402.09353).

    ``W' = m ⊙ V / ‖V‖`` with ``V = W + s·B A`` and the norm per output row (over d_in); the
    magnitude ``m`` (d_out, named ``lora_magnitude_vector`` as in PEFT) starts at ``‖W‖`` so the
    output equals the base at init. The norm is detached (paper §4.3, as NVlabs and PEFT), and is
    computed under no_grad. Forward (PEFT's form, exact with dropout too):
    ``y = W x + b + (m/‖V‖ − 1) ⊙ W x' + (m/‖V‖) ⊙ s·B A x'``, ``x' = dropout(x)``; without dropout
    one matmul with W suffices: ``y = (m/‖V‖) ⊙ (W x + s·B A x) + b``. Merge writes ``W'``; the norm
    used is kept in the buffer ``merge_norm`` so unmerge is exact (PEFT caches it the same way).

    Args:
        r (int, 32), alpha (float, 64), dropout (float, 0.05): paper/NVlabs defaults.
        rslora (bool, false): scale by alpha/√r.

    Raises:
        SpecError: an argument out of range.
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)
    name = "dora"
    args = {
        "r": Arg(32, (int,), positive, "rank"),
        "alpha": Arg(64.0, (float,), positive, "scaling numerator"),
        "dropout": Arg(0.05, (float,), probability, "dropout on the adapter input"),
        "rslora": Arg(False, (bool,), None, "scale by alpha/sqrt(r)"),
    }

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(site.d_out, dtype=site.dtype))
        self.register_buffer("merge_norm", torch.zeros(site.d_out, dtype=torch.float32))

    def init_from_base(self, weight: torch.Tensor) -> None:
        """m ← ‖W‖ per output row (B = 0 at init)."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self._norm(weight).to(self.lora_magnitude_vector.dtype))

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·B A‖ per output row, detached, in fp32."""
        with torch.no_grad():
            v = weight.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            return torch.linalg.vector_norm(v, dim=1)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.passthrough:
            return F.linear(x, weight, bias)
        scale = (self.lora_magnitude_vector / self._norm(weight).to(self.lora_magnitude_vector.dtype))
        xa = x.to(self.lora_A.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base, h = F.linear(xa, weight), F.linear(xa, self.lora_A)
            if base.dim() >= 2:  # one GEMM adds s·B h into W x (as LoRA), one pass applies the scale
                flat = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, self.r), self.lora_B.t(),
                                   alpha=self.scaling)
                y = flat.view(base.shape) * scale
            else:
                y = scale * (base + F.linear(h, self.lora_B) * self.scaling)
        else:
            xd = self.lora_dropout(xa)
            lora = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scaling
            y = F.linear(xa, weight) + (scale - 1) * F.linear(xd, weight) + scale * lora
        y = y.to(x.dtype)
        return y + bias if bias is not None else y

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        norm = self._norm(weight)
        self.merge_norm.copy_(norm)
        v = weight.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        merged = (self.lora_magnitude_vector.float() / norm).unsqueeze(1) * v
        return check_finite(merged, self.site_name).to(weight.dtype)

    def low_rank_factors(self) -> LowRank | None:
        return None  # the magnitude rescales W x too: no x·A·B form

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.lora_magnitude_vector.float() / self._norm(weight)).unsqueeze(1) * v - weight.float()

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """W = W' · ‖V‖/m − s·B A, with ‖V‖ the norm cached at merge."""
        with torch.no_grad():
            w = merged.float() * (self.merge_norm / self.lora_magnitude_vector.float()).unsqueeze(1)
            return (w - (self.lora_B.float() @ self.lora_A.float()) * self.scaling).to(merged.dtype)

    def mixed_factors(self, weight: torch.Tensor) -> MixedFactors | None:
        """Gain m/‖W + s·B A‖ (norm detached, as forward) on top of the LoRA factors."""
        f = super().mixed_factors(weight)
        gain = self.lora_magnitude_vector / self._norm(weight).to(self.lora_magnitude_vector.dtype)
        return f._replace(gain=gain)
