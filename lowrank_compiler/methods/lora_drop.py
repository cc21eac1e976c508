"""LoRA-drop: keep LoRA only at the sites whose warm-up output matters; the others share one pair."""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compiler.errors import InitError
from lowrank_compiler.methods.args import Arg, positive
from lowrank_compiler.methods.base import DataDependentInit, SiteInfo, register_method
from lowrank_compiler.methods.gradstats import GradStats
from lowrank_compiler.methods.lora import LORA_ARGS, LoRA


def _fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


class WarmupLoRA(GradStats):
    """The init pass's accumulator for one LoRA-drop site.

    For the first ``warmup`` taps it steps the adapter's own (A, B) with Adam (torch defaults:
    betas 0.9/0.999, eps 1e-8) on the exact LoRA gradients of that batch,
    ``g_B = s·Δᵀ(X Aᵀ)``, ``g_A = s·(Δ B)ᵀ X``; from then on it sums the importance
    ``Σ_tokens ‖s·B A x‖²`` with the warmed-up pair (``importance``, all-reduced under DDP).
    """

    def __init__(self, ad: LoRADrop, warmup: int, lr: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.ad, self.warmup, self.lr, self.t = ad, warmup, lr, 0
        self.importance = torch.zeros((), dtype=torch.float32, device=device)
        self.moments = [(torch.zeros(p.shape, device=device), torch.zeros(p.shape, device=device))
                        for p in (ad.lora_A, ad.lora_B)]

    @torch.no_grad()
    def update(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        x2, d2 = self._flat(x, dy)
        ad, s = self.ad, self.ad.scaling
        a, b = ad.lora_A.float(), ad.lora_B.float()
        h = x2 @ a.t()
        if self.updates > self.warmup:
            self.importance += (s * h @ b.t()).pow(2).sum()
            return
        self.t += 1
        grads = (s * (d2 @ b).t() @ x2, s * d2.t() @ h)
        for p, g, (m, v) in zip((ad.lora_A, ad.lora_B), grads, self.moments):
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            denom = (v / (1 - 0.999**self.t)).sqrt_().add_(1e-8)
            p.sub_((self.lr / (1 - 0.9**self.t) * m / denom).to(p.dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [self.importance]


@register_method
class LoRADrop(DataDependentInit, LoRA):
    """LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation (Zhou et al. 2024,
    arXiv:2402.07721). No code is published; the choices marked "decided here" are ours.

    Stage 1 runs inside ``lrc.transform(..., data=, loss_fn=)`` (``passes.initialize``): the first
    ``warmup_steps`` batches train this LoRA (Adam, ``warmup_lr``, no dropout); the remaining init
    batches measure the importance ``g_i = mean over batches of Σ_tokens ‖s·B_i A_i x_i‖²`` with the
    warmed-up pair. Normalized over all LoRA-drop sites, the sites are sorted by importance and kept
    until the cumulative importance reaches ``threshold`` (the site that crosses it is kept).
    Decided here: every kept site gets a fresh LoRA (A kaiming-uniform from ``seed`` and the site name,
    B = 0: stage 2 trains from scratch, the output equals the base model after init); all other sites
    with the same (d_out, d_in) share ONE fresh pair, held by every member as the same Parameter
    objects (the optimizer sees it once; merge/export expand it per site). Buffers ``kept``,
    ``importance`` and ``initialized`` are saved; loading re-ties the shared pairs.

    Args:
        r (int, 8), alpha (float, 8), dropout (float, 0.0), rslora (bool, false): as LoRA.
        threshold (float, 0.9): cumulative normalized importance the kept sites must reach, in (0, 1].
        warmup_steps (int, 8): init batches that train the warm-up LoRA (the rest measure importance).
        warmup_lr (float, 1e-3): Adam learning rate of the warm-up.
        seed (int, 0): seed of the stage-2 re-initialization.

    Raises:
        SpecError: bad argument. InitError: no init batch is left after the warm-up to measure importance.
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)
    name = "lora_drop"
    args = {
        **LORA_ARGS,
        "threshold": Arg(0.9, (float,), _fraction, "cumulative importance of the kept sites"),
        "warmup_steps": Arg(8, (int,), positive, "init batches that train the warm-up LoRA"),
        "warmup_lr": Arg(1e-3, (float,), positive, "Adam lr of the warm-up"),
        "seed": Arg(0, (int,), None, "seed of the stage-2 init"),
    }

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("kept", torch.ones((), dtype=torch.bool))
        self.register_buffer("importance", torch.zeros((), dtype=torch.float32))
        self._warming = False

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self._warming or self.passthrough:
            return super().forward(x, weight, bias)
        # warm-up inside passes.initialize: snapshots of A, B, so the accumulator can step the pair in
        # place during backward without touching tensors this graph saved
        out = F.linear(x, weight, bias)
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A.clone()), self.lora_B.clone())
        return out + (h * self.scaling).to(out.dtype)

    def init_stats(self, device: torch.device | None = None) -> GradStats:
        self._warming = True
        return WarmupLoRA(self, int(self.config["warmup_steps"]), float(self.config["warmup_lr"]), device)

    def initialize(self, stats: GradStats, weight: torch.Tensor) -> None:
        """Store this site's importance (mean over the post-warm-up batches); the decision is global."""
        self._warming = False
        warm = int(self.config["warmup_steps"])
        n = stats.n_batches - warm
        if n <= 0:
            raise InitError(f"site {self.site_name!r}: lora_drop(warmup_steps={warm}) got {stats.n_batches} init "
                            f"batches; the first {warm} train the warm-up LoRA and at least one more must measure "
                            f"the importance: pass init_batches > {warm} (and that much data)")
        self.importance.fill_(float(stats.importance) * stats.n_batches / n)
        return None

    # -- the global decision ----------------------------------------------------
    @staticmethod
    def kept_sites(importance: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool mask of the sites kept: most important first until the normalized cumulative sum ≥ threshold."""
        total = float(importance.sum())
        if total <= 0 or not math.isfinite(total):
            return torch.ones_like(importance, dtype=torch.bool)
        order = torch.argsort(importance, descending=True, stable=True)
        cum = torch.cumsum(importance[order] / total, 0)
        n = int((cum < threshold - 1e-12).sum()) + 1
        keep = torch.zeros_like(importance, dtype=torch.bool)
        keep[order[:n]] = True
        return keep

    def _share_key(self) -> tuple:
        return (self.d_out, self.d_in, self.r, float(self.scaling), self.lora_A.dtype, self.lora_A.device)

    def _fresh(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A kaiming-uniform(a=√5) from a generator seeded by (seed, key), B = 0)."""
        g = torch.Generator().manual_seed((int(self.config["seed"]) * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        bound = 1.0 / math.sqrt(self.d_in)
        a = (torch.rand(self.r, self.d_in, generator=g) * 2 - 1) * bound
        return a.to(self.lora_A), torch.zeros_like(self.lora_B)

    @classmethod
    @torch.no_grad()
    def initialize_all(cls, adapters: list[Any]) -> None:
        groups: dict[float, list[LoRADrop]] = {}
        for a in adapters:
            groups.setdefault(float(a.config["threshold"]), []).append(a)
        for threshold, ads in groups.items():
            keep = cls.kept_sites(torch.stack([a.importance.cpu() for a in ads]), threshold)
            for a, k in zip(ads, keep.tolist()):
                a.kept.fill_(k)
                a.initialized.fill_(True)
                new_a, new_b = a._fresh(a.site_name if k else f"shared/{a.d_out}x{a.d_in}")
                a.lora_A = nn.Parameter(new_a)
                a.lora_B = nn.Parameter(new_b)
        cls.tie(adapters)

    @classmethod
    def tie(cls, adapters: list[Any]) -> None:
        """Every dropped site of one (d_out, d_in) holds the first such site's Parameters."""
        owner: dict[tuple, LoRADrop] = {}
        for a in adapters:
            if not isinstance(a, LoRADrop) or bool(a.kept) or not bool(a.initialized):
                continue
            first = owner.setdefault(a._share_key(), a)
            if first is not a:
                a.lora_A, a.lora_B = first.lora_A, first.lora_B
