"""LoRA: y = W x + b + s·B A dropout(x)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterMethod, Arg, SiteInfo, positive, probability, register_method


@register_method
class LoRA(AdapterMethod):
    """LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685).

    ``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with A (r × d_in) kaiming-uniform(a=√5), B (d_out × r)
    zeros, ``s = alpha / r`` (``alpha / √r`` with ``rslora=true``). Same init and names as PEFT
    (``lora_A``, ``lora_B``), so weights move between the two 1:1.

    Args:
        r (int, 8): rank, 1 ≤ r ≤ min(d_in, d_out).
        alpha (float, 8): scaling numerator.
        dropout (float, 0.0): dropout on the adapter input, in [0, 1).
        rslora (bool, false): rank-stabilized scaling alpha/√r.

    Raises:
        SpecError: unknown argument, wrong type, or out of range.
    """

    name = "lora"
    args = {
        "r": Arg(8, (int,), positive, "rank"),
        "alpha": Arg(8.0, (float,), positive, "scaling numerator"),
        "dropout": Arg(0.0, (float,), probability, "dropout on the adapter input"),
        "rslora": Arg(False, (bool,), None, "scale by alpha/sqrt(r)"),
    }

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.r = int(kwargs["r"])
        alpha = float(kwargs["alpha"])
        self.scaling = alpha / math.sqrt(self.r) if kwargs["rslora"] else alpha / self.r
        self.lora_A = nn.Parameter(torch.empty(self.r, site.d_in, dtype=site.dtype))
        self.lora_B = nn.Parameter(torch.zeros(site.d_out, self.r, dtype=site.dtype))
        self.lora_dropout = nn.Dropout(kwargs["dropout"]) if kwargs["dropout"] > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ~ kaiming_uniform(a=√5), B = 0 (PEFT LoraLayer.reset_lora_parameters)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x), in the adapter's dtype."""
        h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h, self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        if self.merged:
            return out
        h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if out.dtype == h.dtype and out.dim() >= 2:
            # One GEMM does B·h, the scale and the residual add (beta=1): saves two
            # elementwise passes over the d_out-sized output compared with `out + s*B(h)`.
            flat = torch.addmm(
                out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.t(), alpha=self.scaling
            )
            return flat.view(out.shape)
        return out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling
