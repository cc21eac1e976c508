"""FLoRA: per-example multiplicative adapters, a whole mixed batch through one matmul with W."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compiler.methods.base import (
    AdapterMethod,
    Arg,
    SiteInfo,
    check_finite,
    non_negative,
    positive,
    register_method,
)


@register_method
class FLoRA(AdapterMethod):
    """FLoRA (Wen & Chaudhuri 2024, "Batched Low-Rank Adaptation of Foundation Models", arXiv:2312.05677).

    ``n_adapters`` adapters per site; row i uses adapter ``k = adapter_ids[i]`` (−1: the base linear):
    ``y_i = W x_i + b + Σ_{j<r} a_{k,j} ⊙ (W (b_{k,j} ⊙ x_i))``, i.e. the weight ``W ∘ (1 + A_kᵀ B_k)``
    with ``A_k`` (r × d_out, ``flora_out``) and ``B_k`` (r × d_in, ``flora_in``). The ``1 +`` (a fixed
    rank-1 all-ones term) makes the adapter start at the identity with LoRA-style init: outer vectors 0,
    inner vectors ~ N(1, ``init_std``). The r + 1 inputs ``[x, b_1 ⊙ x, …, b_r ⊙ x]`` of every row go
    through ONE matmul with W, whatever adapters the rows use. Without ``adapter_ids`` (a plain
    transformed graph) every row uses adapter ``active`` (a saved buffer; ``select(k)``), which is also
    the one merge folds in: ``ΔW = W ∘ (A_kᵀ B_k)``.

    Args:
        r (int, 4): terms per adapter.
        n_adapters (int, 1): adapters per site (``adapter_ids`` in [−1, n_adapters)).
        init_std (float, 0.1): spread of the inner vectors around 1.

    Raises:
        SpecError: an argument out of range.
    """

    name = "flora"
    args = {
        "r": Arg(4, (int,), positive, "terms per adapter"),
        "n_adapters": Arg(1, (int,), positive, "adapters per site, selected per row by adapter_ids"),
        "init_std": Arg(0.1, (float,), non_negative, "std of the inner vectors around 1"),
    }
    batched = True

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.r, self.n_slots = int(self.config["r"]), int(self.config["n_adapters"])
        self.flora_out = nn.Parameter(torch.zeros(self.n_slots, self.r, site.d_out, dtype=site.dtype))
        self.flora_in = nn.Parameter(torch.empty(self.n_slots, self.r, site.d_in, dtype=site.dtype))
        self.register_buffer("active", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    @classmethod
    def check_site(cls, args: dict[str, Any], site: SiteInfo) -> str | None:
        """r ≤ min(d_in, d_out) (a rank-r Hadamard factor has no more freedom past it) and all adapters
        together at most 64× the weight's elements; checked before anything is allocated."""
        r, n, d = int(args.get("r", 4)), int(args.get("n_adapters", 1)), min(site.d_in, site.d_out)
        if r > d:
            return f"flora: r={r} is larger than min(d_in, d_out)={d} of site {site.name!r} ({site.d_out}x{site.d_in})"
        if n * r * (site.d_in + site.d_out) > 64 * site.d_in * site.d_out:
            return (f"flora: n_adapters={n} × r={r} adapters would hold more than 64× the elements of site "
                    f"{site.name!r} ({site.d_out}x{site.d_in}); at most n_adapters="
                    f"{max(1, 64 * site.d_in * site.d_out // (r * (site.d_in + site.d_out)))} at this r")
        return None

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.flora_out)
        nn.init.normal_(self.flora_in, 1.0, float(self.config["init_std"]))

    def select(self, k: int) -> None:
        """Use adapter ``k`` for calls without ``adapter_ids`` and for merge."""
        if not 0 <= k < self.n_slots:
            raise ValueError(f"{self.site_name}: adapter {k} is not in [0, {self.n_slots})")
        self.active.fill_(k)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.passthrough:
            return F.linear(x, weight, bias)
        flat = x.reshape(1, -1, x.shape[-1])
        y = self.forward_rows(flat, weight, bias, self.active.reshape(1))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward_rows(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     adapter_ids: torch.Tensor) -> torch.Tensor:
        """Row i of ``x`` (dim 0, batch) with adapter ``adapter_ids[i]``; −1 rows get the base linear."""
        if self.passthrough:
            return F.linear(x, weight, bias)
        n = adapter_ids.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).to(self.flora_in.dtype)
        idx = adapter_ids.clamp(min=0)  # −1 rows: any adapter's inner vectors, outer vectors zeroed
        inner = self.flora_in[idx]  # [N, r, d_in]
        outer = self.flora_out[idx] * (adapter_ids >= 0).to(self.flora_out.dtype).view(n, 1, 1)
        xs = torch.cat([x3.unsqueeze(2), x3.unsqueeze(2) * inner.unsqueeze(1)], dim=2)  # [N, T, r+1, d_in]
        h = F.linear(xs, weight.to(xs.dtype))  # the one matmul with W: [N, T, r+1, d_out]
        y = h[:, :, 0] + (h[:, :, 1:] * outer.unsqueeze(1)).sum(2)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        k = int(self.active)
        return weight.float() * (self.flora_out[k].float().t() @ self.flora_in[k].float())

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """W = W' ⊘ (1 + A_kᵀ B_k) (elementwise; exact up to rounding while no factor entry is −1)."""
        k = int(self.active)
        factor = 1.0 + self.flora_out[k].float().t() @ self.flora_in[k].float()
        return check_finite(merged.float() / factor, self.site_name).to(merged.dtype)
