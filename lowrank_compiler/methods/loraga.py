"""LoRA-GA: LoRA initialized from the SVD of an estimated full fine-tuning gradient."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import torch

from lowrank_compiler.errors import InitError
from lowrank_compiler.methods.args import Arg, non_negative, one_of, positive
from lowrank_compiler.methods.base import SiteInfo, register_method
from lowrank_compiler.methods.gradstats import ExactGradient, GradientSketch, GradStats
from lowrank_compiler.methods.lora import LORA_ARGS, LoRA, OffsetFactors

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "unit", "gd")


@register_method
class LoRAGA(OffsetFactors, LoRA):
    """LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu, Li 2024, arXiv:2407.05000).

    Follows the authors' code (github.com/Outsider565/LoRA-GA, ``peft/tuners/lora/layer.py::
    lora_ga_init``), not PEFT's port. With G the mean gradient ∂L/∂W over the init batches
    (train mode, fp32) and ``G ≈ U S Vᵀ`` from ``torch.svd_lowrank(G, q=min(4r, d), niter=4)``:
    * direction ``ArB2r``: A0 = Vᵀ[0:r], B0 = U[:, r:2r]; ``A2rBr``: A0 = Vᵀ[r:2r], B0 = U[:, :r];
      ``ArBr``: A0 = odd, B0 = even indices of 0..2r; ``random``: a seeded split of 0..2r. Every
      split covers 1..2r, so the first SGD step ∝ B0B0ᵀG + G A0ᵀA0 = the best rank-2r approx. of G.
    * scale ``stable``: A0, B0 both × d_out^(1/4)/√gamma; ``unit``: none; ``gd``: both / s.
    * offset: W ← W − s·B0 A0 in fp32 (cast back), so the output at init is unchanged.

    Adapter tensors are fp32 whatever the base dtype. A0, B0 stay as buffers (``init_A``,
    ``init_B``) so the adapter can be re-expressed against the ORIGINAL base as the rank-2r pair
    A' = [A; A0], B' = [B, −B0] (:meth:`original_base_factors`).

    ``svd="sketch"`` (decided here, beyond the paper) never forms G: it streams a two-sided
    sketch (Tropp et al. 2017) with k = 2r + oversample range and l = 2k co-range columns and
    takes the top 2r triplets from it; memory O((d_out + d_in)·k) per site instead of d_out·d_in.

    Args:
        r (int, 8), alpha (float, 8), dropout (float, 0.0), rslora (bool, false): as LoRA.
        direction (str, "ArB2r"): one of ArB2r, A2rBr, ArBr, random.
        scale (str, "stable"): one of stable, unit, gd.
        gamma (float, 16): the ``stable`` scale's γ.
        svd (str, "exact"): "exact" (full fp32 gradient + svd_lowrank) or "sketch" (streaming).
        oversample (int, 16): extra sketch columns beyond 2r (sketch only).
        seed (int, 0): seeds dropout during estimation, svd_lowrank, the sketch and ``random``.

    Raises:
        SpecError: bad argument. InitError: estimation statistics missing or non-finite.
    """

    name = "loraga"
    args = {
        **LORA_ARGS,
        "direction": Arg("ArB2r", (str,), one_of(*DIRECTIONS), "which singular vectors go to A and B"),
        "scale": Arg("stable", (str,), one_of(*SCALES), "scaling of A0 and B0"),
        "gamma": Arg(16.0, (float,), positive, "gamma of the stable scale"),
        "svd": Arg("exact", (str,), one_of("exact", "sketch"), "full gradient or streaming sketch"),
        "oversample": Arg(16, (int,), non_negative, "sketch columns beyond 2r"),
        "seed": Arg(0, (int,), None, "seed of the init's randomness"),
    }

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(dataclasses.replace(site, dtype=torch.float32), **kwargs)
        self._register_offset(site, torch.float32)

    @classmethod
    def check_site(cls, args: dict[str, Any], site: SiteInfo) -> str | None:
        r = args.get("r")
        if isinstance(r, int) and 2 * r > min(site.d_in, site.d_out):
            return (f"{cls.name}: 2r={2 * r} exceeds min(d_in, d_out)={min(site.d_in, site.d_out)} of site "
                    f"{site.name!r} ({site.d_out}x{site.d_in}); LoRA-GA uses 2r singular vectors, use r <= "
                    f"{min(site.d_in, site.d_out) // 2}")
        return None

    # -- data-dependent init ---------------------------------------------------
    def site_seed(self) -> int:
        """The seed of this site's randomness: ``seed`` mixed with the site name (rank-independent)."""
        return (int(self.config["seed"]) * 1_000_003 + zlib.crc32(self.site_name.encode())) % (2**63 - 1)

    def init_stats(self, device: torch.device | None = None) -> GradStats:
        """A fresh accumulator of the statistic this adapter's ``svd`` mode needs."""
        if self.config["svd"] == "sketch":
            k = 2 * self.r + int(self.config["oversample"])
            return GradientSketch(self.d_out, self.d_in, k, 2 * k, self.site_seed(), device)
        return ExactGradient(self.d_out, self.d_in, device)

    def initialize(self, stats: GradStats, weight: torch.Tensor) -> torch.Tensor:
        """Set A0, B0 from ``stats`` (mean gradient) and return the offset weight W − s·B0 A0."""
        if stats.n_batches <= 0:
            raise InitError(f"site {self.site_name!r}: no gradient was recorded (0 batches reached this "
                            "site); check that data is not empty and that loss_fn depends on the output")
        if not all(bool(torch.isfinite(t).all()) for t in stats.tensors()):
            raise InitError(f"site {self.site_name!r}: the gradient statistics are non-finite (NaN/inf in the "
                            "site's input activations or gradients); check the data")
        r = self.r
        q = min(4 * r, self.d_out, self.d_in)
        cuda = [weight.device.index or 0] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.site_seed())
            U, _, V = stats.top(q, niter=4)
        if U.shape[1] < 2 * r:
            raise InitError(f"site {self.site_name!r}: the sketch holds only {U.shape[1]} directions, "
                            f"need 2r={2 * r}; raise oversample")
        Vh = V.t()
        direction = self.config["direction"]
        if direction == "ArB2r":
            ia, ib = list(range(r)), list(range(r, 2 * r))
        elif direction == "A2rBr":
            ia, ib = list(range(r, 2 * r)), list(range(r))
        elif direction == "ArBr":  # authors: B = U[:, 0:2r:2], A = Vᵀ[1:2r:2]
            ia, ib = list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
        else:
            perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(self.site_seed())).tolist()
            ia, ib = perm[:r], perm[r:]
        A0, B0 = Vh[ia].contiguous(), U[:, ib].contiguous()
        scale = self.config["scale"]
        if scale == "stable":
            c = self.d_out ** 0.25 / float(self.config["gamma"]) ** 0.5
            A0, B0 = A0 * c, B0 * c
        elif scale == "gd":
            A0, B0 = A0 / self.scaling, B0 / self.scaling
        A0, B0 = A0.float(), B0.float()
        self._set_factors(A0, B0)
        new = weight.detach().float() - self.scaling * (B0 @ A0).to(weight.device)
        return new.to(weight.dtype)
