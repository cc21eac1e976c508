"""VeRA: one shared frozen random pair (A, B); per site only the scaling vectors d and b train."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compiler.methods.args import Arg, non_negative, positive, probability
from lowrank_compiler.methods.base import AdapterMethod, LowRank, MixedFactors, SiteInfo, register_method

_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _kaiming(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """kaiming_uniform (gain √2, fan_in = shape[1]) drawn from ``gen``, as PEFT ``vera.model._kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def shared_projections(
    r: int, max_out: int, max_in: int, seed: int, d_out: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's slices ``A[:, :d_in]``, ``B[:d_out, :]`` of the shared frozen pair (A: r × max_in,
    B: max_out × r), the same draws as PEFT ``VeraConfig(projection_prng_key=seed)``.

    The slices are contiguous and cached per (pair, d_in) / (pair, d_out): sites of the same shape
    hold the same tensor objects.
    """
    key = (r, max_out, max_in, seed)
    a, b = _SHARED.get(key + ("A", d_in)), _SHARED.get(key + ("B", d_out))
    if a is None or b is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        full_a, full_b = _kaiming((r, max_in), gen), _kaiming((max_out, r), gen)
        a = _SHARED.setdefault(key + ("A", d_in), full_a[:, :d_in].contiguous())
        b = _SHARED.setdefault(key + ("B", d_out), full_b[:d_out, :].contiguous())
    return a, b


@register_method
class VeRA(AdapterMethod):
    """VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2023, arXiv:2310.11454).

    ``y = W x + b_bias + Λ_b · B · Λ_d · A · dropout(x)`` (no alpha/r). A (r × max d_in) and B (max d_out × r)
    are drawn once, kaiming-uniform from ``torch.Generator().manual_seed(seed)`` (A first), at the
    largest d_in / d_out over the sites of the same rule, and sliced ``A[:, :d_in]``, ``B[:d_out, :]``
    per site — the same matrices as PEFT (``projection_prng_key=seed``); slices are stored
    contiguous and shared by sites of equal shape. Trainable per site:
    ``vera_lambda_d`` (r, init ``d_init``) and ``vera_lambda_b`` (d_out, init 0), PEFT's names.
    Choice: A and B are non-persistent buffers (regenerated from the seed at load, so adapter files
    stay small; PEFT's ``save_projection=False``); output equals the base at init (b = 0).

    Args:
        r (int, 256): rank of the shared pair (PEFT default); must fit every site.
        d_init (float, 0.1): initial value of Λ_d.
        seed (int, 0): PRNG seed of the shared pair.
        dropout (float, 0.0): dropout on the adapter input.

    Raises:
        SpecError: r larger than a site's min(d_in, d_out), or an argument out of range.
    """

    name = "vera"
    args = {
        "r": Arg(256, (int,), positive, "rank of the shared random pair"),
        "d_init": Arg(0.1, (float,), None, "initial value of the d vector"),
        "seed": Arg(0, (int,), non_negative, "PRNG seed of the shared pair"),
        "dropout": Arg(0.0, (float,), probability, "dropout on the adapter input"),
    }

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.r = int(self.config["r"])
        max_out, max_in = site.extra.get("group_shape", (site.d_out, site.d_in))
        a, b = shared_projections(self.r, max_out, max_in, int(kwargs["seed"]), site.d_out, site.d_in)
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), float(kwargs["d_init"]), dtype=site.dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(site.d_out, dtype=site.dtype))
        self.vera_dropout = nn.Dropout(kwargs["dropout"]) if kwargs["dropout"] > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        if self.passthrough:
            return out
        # Λ_d, Λ_b scale the activations (folding them into A, B would add two weight-gradient GEMMs)
        a, b = self.vera_A.to(self.vera_lambda_d.dtype), self.vera_B.to(self.vera_lambda_b.dtype)
        h = F.linear(self.vera_dropout(x.to(a.dtype)), a) * self.vera_lambda_d
        if out.dtype == h.dtype:
            return torch.addcmul(out, F.linear(h, b), self.vera_lambda_b)
        return out + (F.linear(h, b) * self.vera_lambda_b).to(out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        f = self.low_rank_factors()
        return f.B.float() @ f.A.float()

    def low_rank_factors(self) -> LowRank | None:
        """(Λ_d A, Λ_b B, 1): VeRA is a rank-r adapter whose factors are scaled shared projections."""
        a = self.vera_lambda_d.detach().float().unsqueeze(1) * self.vera_A.float()
        b = self.vera_lambda_b.detach().float().unsqueeze(1) * self.vera_B.float()
        return LowRank(a, b, 1.0)

    def mixed_factors(self, weight: torch.Tensor) -> MixedFactors | None:
        """(Λ_d A, Λ_b B), differentiable in Λ_d and Λ_b (the shared pair stays frozen)."""
        a = self.vera_lambda_d.unsqueeze(1) * self.vera_A.to(self.vera_lambda_d.dtype)
        b = self.vera_lambda_b.unsqueeze(1) * self.vera_B.to(self.vera_lambda_b.dtype)
        p = self.vera_dropout.p if isinstance(self.vera_dropout, nn.Dropout) else 0.0
        return MixedFactors(a, b, None, p)
