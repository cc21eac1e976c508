"""FLoRA: per-example multiplicative adapters, a whole mixed batch through one matmul with W."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compiler.methods.args import Arg, non_negative, positive
from lowrank_compiler.methods.base import AdapterMethod, SiteInfo, check_finite, register_method


@register_method
class FLoRA(AdapterMethod):
    """FLoRA as its paper defines it (Wen & Chaudhuri 2024, "Batched Low-Rank Adaptation of Foundation
    Models", arXiv:2312.05677): ``Y = φ(A ∘ ((B ∘ X) W₀))``, i.e. row i with adapter ``k = adapter_ids[i]``
    uses the weight ``W ∘ (A_kᵀ B_k)``: ``y_i = Σ_{j<r} a_{k,j} ⊙ (W (b_{k,j} ⊙ x_i)) + b`` (−1: the base
    linear). ``A_k`` (r × d_out, ``flora_out``) and ``B_k`` (r × d_in, ``flora_in``); r is the paper's
    rank (the number of pairs). The r inputs ``b_j ⊙ x`` of every row go through ONE matmul with W,
    whatever adapters the rows use.

    Initialisation (decided here; the paper gives none that starts at W₀): pair 0 is all ones on both
    sides (``A_kᵀ B_k = 1``, so the model starts at the base), pairs j ≥ 1 have outer vectors 0 and inner
    vectors ~ N(1, ``init_std``) (LoRA-style: they start silent, their outer vectors get gradient at once;
    distinct inner vectors break the symmetry between pairs). Every entry trains. Without
    ``adapter_ids`` (a plain transformed graph) every row uses adapter ``active`` (a saved buffer;
    ``select(k)``), which is also the one merge folds in: ``W' = W ∘ (A_kᵀ B_k)``.

    ``flora_res`` is the residual variant ``W ∘ (1 + A_kᵀ B_k)`` (see its docstring).

    Args:
        r (int, 4): pairs per adapter (the paper's rank).
        n_adapters (int, 1): adapters per site (``adapter_ids`` in [−1, n_adapters)).
        init_std (float, 0.1): spread of the inner vectors around 1.

    Raises:
        SpecError: an argument out of range.
    """

    name = "flora"
    args = {
        "r": Arg(4, (int,), positive, "pairs per adapter (the paper's rank)"),
        "n_adapters": Arg(1, (int,), positive, "adapters per site, selected per row by adapter_ids"),
        "init_std": Arg(0.1, (float,), non_negative, "std of the inner vectors around 1"),
    }
    batched = True
    #: True for the residual variant: a fixed all-ones pair is added to every adapter (W ∘ (1 + AᵀB))
    ones_term: ClassVar[bool] = False

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
        if not self.ones_term:
            with torch.no_grad():
                self.flora_out[:, 0].fill_(1.0)
                self.flora_in[:, 0].fill_(1.0)

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

    def row_factors(self, adapter_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inner [N, R, d_in], outer [N, R, d_out]) of each row: ``y = Σ_j outer_j ⊙ W (inner_j ⊙ x)``.
        −1 rows get pair 0 = (1, 1) and zero outer vectors elsewhere (the residual form: all outer vectors
        zero, its ones pair is the base): exactly the base linear."""
        n = adapter_ids.shape[0]
        valid = (adapter_ids >= 0).view(n, 1, 1)
        idx = adapter_ids.clamp(min=0)
        inner, outer = self.flora_in[idx], self.flora_out[idx]
        first = (torch.arange(self.r, device=outer.device) == (-1 if self.ones_term else 0)).to(outer.dtype)
        first = first.view(1, self.r, 1)
        return torch.where(valid, inner, torch.ones_like(inner)), torch.where(valid, outer, first)

    def forward_rows(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     adapter_ids: torch.Tensor) -> torch.Tensor:
        """Row i of ``x`` (dim 0, batch) with adapter ``adapter_ids[i]``; −1 rows get the base linear."""
        if self.passthrough:
            return F.linear(x, weight, bias)
        n = adapter_ids.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).to(self.flora_in.dtype)
        inner, outer = self.row_factors(adapter_ids)
        xs = x3.unsqueeze(2) * inner.unsqueeze(1)  # [N, T, R, d_in]
        if self.ones_term:
            xs = torch.cat([x3.unsqueeze(2), xs], dim=2)
        h = F.linear(xs, weight.to(xs.dtype))  # the one matmul with W: [N, T, R(+1), d_out]
        y = (h[:, :, 1:] if self.ones_term else h) * outer.unsqueeze(1)
        y = y.sum(2) + h[:, :, 0] if self.ones_term else y.sum(2)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def multiplier(self) -> torch.Tensor:
        """The elementwise factor M of the active adapter (merged weight ``W ∘ M``), fp32."""
        k = int(self.active)
        m = self.flora_out[k].float().t() @ self.flora_in[k].float()
        return 1.0 + m if self.ones_term else m

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() * (self.multiplier() - 1.0)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """W = W' ⊘ M (elementwise; exact up to rounding while no entry of M is 0)."""
        return check_finite(merged.float() / self.multiplier(), self.site_name).to(merged.dtype)
