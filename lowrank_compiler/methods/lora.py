"""LoRA: y = W x + b + s·B A dropout(x)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compiler.methods import lora_inits
from lowrank_compiler.methods.args import Arg, one_of, positive, probability
from lowrank_compiler.methods.base import (
    AdapterMethod,
    DataDependentInit,
    LowRank,
    MixedFactors,
    SiteInfo,
    register_method,
)
from lowrank_compiler.methods.gradstats import InputCovariance, InputPCA

#: the arguments every LoRA-shaped method shares (subclasses spread these, not ``LoRA.args``)
LORA_ARGS = {
    "r": Arg(8, (int,), positive, "rank"),
    "alpha": Arg(8.0, (float,), positive, "scaling numerator"),
    "dropout": Arg(0.0, (float,), probability, "dropout on the adapter input"),
    "rslora": Arg(False, (bool,), None, "scale by alpha/sqrt(r)"),
}


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
        init (str, "default"): PEFT's ``init_lora_weights``: "default" (kaiming A, B = 0), "gaussian",
            "orthogonal" (r even), "eva" (data), "pissa", "pissa_niter_<k>", "olora", "corda" (IPM, data),
            "corda_kpm", "loftq" (docs/inits.md).
        loftq_bits (int, 4), loftq_iter (int, 1): LoftQ's quantizer (NF4 or int8) and iterations. The last four move the base weight by −s·B0 A0 (:class:`OffsetLoRA`).

    Raises:
        SpecError: unknown argument, wrong type, or out of range.
    """

    name = "lora"
    fp32_master = True  # bf16 / fp16 bases: fp32 A, B and optimizer state (benchmarks/bench_bf16_adapters.py)
    args = {**LORA_ARGS, "init": Arg("default", (str,), lora_inits.check_init, "PEFT's init_lora_weights"),
            "loftq_bits": Arg(4, (int,), one_of(4, 8), "LoftQ: 4 (NF4) or 8 (int8)"),
            "loftq_iter": Arg(1, (int,), positive, "LoftQ: alternating iterations")}

    def __new__(cls, *args: Any, **kwargs: Any) -> LoRA:
        """``lora(init=...)`` with an init that moves the base weight builds an :class:`OffsetLoRA`
        (same method name, spec and tensors plus the offset buffers); every other case builds ``cls``."""
        init = str(kwargs.get("init", "default"))
        if cls is LoRA and lora_inits.moves_base(init):
            cls = OffsetLoRA
        elif cls is LoRA and init == "eva":
            cls = EvaLoRA
        return super().__new__(cls)

    @classmethod
    def check_site(cls, args: dict[str, Any], site: SiteInfo) -> str | None:
        if args.get("init") == "orthogonal" and int(args.get("r", 1)) % 2:
            return f"{cls.name}: init='orthogonal' needs an even r (it splits r into two halves), got r={args['r']}"
        return super().check_site(args, site)

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        cfg = self.config
        self.r = int(cfg["r"])
        alpha = float(cfg["alpha"])
        self.scaling = alpha / math.sqrt(self.r) if cfg.get("rslora", False) else alpha / self.r
        dropout = float(cfg.get("dropout", 0.0))
        dtype = self.param_dtype(site)
        self.lora_A = nn.Parameter(torch.empty(self.r, site.d_in, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(site.d_out, self.r, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ~ kaiming_uniform(a=√5), B = 0 (PEFT LoraLayer.reset_lora_parameters); ``init="gaussian"``:
        A ~ N(0, 1/r²); ``"orthogonal"``: PEFT's orthogonal pair (B A = 0, both nonzero)."""
        init = self.config.get("init", "default")
        if init == "gaussian":
            lora_inits.gaussian(self.lora_A, self.lora_B, self.r)
        elif init == "orthogonal":
            A, B = lora_inits.orthogonal(self.d_in, self.d_out, self.r)
            with torch.no_grad():
                self.lora_A.copy_(A)
                self.lora_B.copy_(B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x), in the adapter's dtype."""
        h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h, self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.passthrough:
            return F.linear(x, weight, bias)
        if self._merge_on_the_fly(x, weight, bias):
            # Inference with many rows: W + s·B A costs d_out·d_in·r FLOPs and one d_out × d_in write,
            # far less than the low-rank branch's passes over the (rows × d) activations; the adapter
            # stays separate (swappable), only the arithmetic is merged (rounding differs as merge() does).
            return F.linear(x, self._folded(weight), bias)
        if x.dim() >= 2 and x.dtype == weight.dtype == self.lora_A.dtype:
            # Flatten to 2-D so the base linear returns a fresh, contiguous (N, d_out) tensor, then let one
            # in-place GEMM do B·h, the scale and the residual add (beta=1). Versus PEFT's `out + s*B(A x)`
            # this saves the B(h), mul and add passes over the d_out-sized output, and versus an
            # out-of-place addmm the copy of `out`. Safe under autograd: the base GEMM saves only x and W.
            x2 = x.reshape(-1, x.shape[-1])
            out = F.linear(x2, weight, bias)
            drop = self.lora_dropout  # no Identity module call: a decode step pays Python per site
            h = F.linear(x2 if type(drop) is nn.Identity else drop(x2), self.lora_A)
            out.addmm_(h, self.lora_B.t(), alpha=self.scaling)
            return out.view(*x.shape[:-1], out.shape[-1])
        out = F.linear(x, weight, bias)
        return (out + self.lora_branch(x)).to(out.dtype)  # fp32 masters: one rounding of the sum, as PEFT

    def _merge_on_the_fly(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True for eager inference (no grad needed, no active dropout, not being traced) when the
        rows × (d_in + 2·d_out) activation traffic of the branch exceeds the 2·d_in·d_out of a merge."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        if not (x.dtype == weight.dtype == self.lora_A.dtype):
            return False
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, self.lora_A, self.lora_B)):
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        if not isinstance(rows, int):  # symbolic shape (tracing): never add a guard on the batch size
            return False
        return rows * (self.d_in + 2 * self.d_out) > 2 * self.d_in * self.d_out

    def _folded(self, weight: torch.Tensor) -> torch.Tensor:
        """W + s·B A as one addmm: in W's dtype when the factors share it, else in fp32 rounded once."""
        if weight.dtype == self.lora_A.dtype == self.lora_B.dtype:
            return torch.addmm(weight, self.lora_B, self.lora_A, alpha=self.scaling)
        return torch.addmm(weight.float(), self.lora_B.float(), self.lora_A.float(), alpha=self.scaling).to(weight.dtype)

    def inference_weight(self, weight: torch.Tensor) -> torch.Tensor | None:
        """W + s·B A (the on-the-fly merge's formula; bf16/fp16 bases with fp32 masters: fp32, rounded once);
        ``weight`` itself when passthrough; None while dropout is active or when a subclass changed forward."""
        if self.passthrough:
            return weight
        if type(self).forward is not LoRA.forward or type(self).lora_branch is not LoRA.lora_branch:
            return None
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            return None
        with torch.no_grad():
            return self._folded(weight)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def low_rank_factors(self) -> LowRank | None:
        return LowRank(self.lora_A.detach(), self.lora_B.detach(), float(self.scaling))

    def mixed_factors(self, weight: torch.Tensor) -> MixedFactors | None:
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return MixedFactors(self.lora_A, self.lora_B * self.scaling, None, p)


class OffsetFactors(DataDependentInit):
    """Mixin for a LoRA whose init moves the base weight by −s·B0 A0 (:class:`OffsetLoRA`, LoRA-GA).

    A = B = 0 until ``passes.initialize`` runs; A0, B0 stay as buffers ``init_A``/``init_B`` (saved with the
    adapter; ``initialized`` stops a re-init) so merge folds the offset base and :meth:`original_weight` /
    ``original_base_factors`` re-express the adapter against the unmodified base.
    """

    modifies_base = True
    identity_before_init = True

    def _register_offset(self, site: SiteInfo, dtype: torch.dtype) -> None:
        self.register_buffer("init_A", torch.zeros(self.r, site.d_in, dtype=dtype))
        self.register_buffer("init_B", torch.zeros(site.d_out, self.r, dtype=dtype))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def reset_parameters(self) -> None:
        """A = B = 0 until initialize(): the branch is exactly zero and no RNG is consumed."""
        nn.init.zeros_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def _set_factors(self, A0: torch.Tensor, B0: torch.Tensor) -> None:
        with torch.no_grad():
            for dst, src in ((self.lora_A, A0), (self.lora_B, B0), (self.init_A, A0), (self.init_B, B0)):
                dst.copy_(src)
            self.initialized.fill_(True)

    def base_offset(self) -> LowRank | None:
        """W_now = W_original − s·B0 A0 (zero before initialization)."""
        return LowRank(self.init_A, self.init_B, float(self.scaling))

    def original_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight before the offset, W + s·B0 A0, from the current (offset) base."""
        return (weight.float() + self.scaling * (self.init_B.float() @ self.init_A.float())).to(weight.dtype)


class OffsetLoRA(OffsetFactors, LoRA):
    """``lora(init=...)`` for the PEFT inits that start from the base weight and move it: PiSSA,
    ``pissa_niter_<k>``, OLoRA, LoftQ (no data), CorDA IPM/KPM (input covariance from ``data``).

    Built by ``LoRA(...)`` itself (``name`` stays "lora"). A = B = 0 until ``passes.initialize``
    runs, then (A0, B0) from ``methods/lora_inits.py`` and the base becomes W − s·B0 A0 (fp32, cast
    back), so the output at init is the base's. A0, B0 stay as buffers ``init_A``/``init_B``: merge
    folds the offset base, save/load keep it (``initialized`` stops a re-init) and
    :meth:`original_base_factors` gives the rank-2r pair ([A; A0], [B, −B0]) for the UNMODIFIED base
    (PEFT export, ``formats/rebase.py``), as LoRA-GA (docs/loraga.md).
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self._register_offset(site, site.dtype)

    def init_stats(self, device: torch.device | None = None) -> InputCovariance | None:
        """CorDA's input covariance (forward only, eval mode, as PEFT's ``preprocess_corda``); None
        for the inits that need no data."""
        if self.config["init"].startswith("corda"):
            return InputCovariance(self.d_in, device)
        return None

    def initialize(self, stats: InputCovariance | None, weight: torch.Tensor) -> torch.Tensor:
        """Set A0, B0 from W (and the covariance for CorDA); return the offset weight W − s·B0 A0."""
        init, s = self.config["init"], self.scaling
        W = weight.detach().float()
        niter = lora_inits.PISSA_NITER.fullmatch(init)
        if init == "loftq":  # the base becomes its quantized value: not a low-rank offset (base_offset None)
            Q, A0, B0 = lora_inits.loftq(W, self.r, int(self.config.get("loftq_bits", 4)),
                                         int(self.config.get("loftq_iter", 1)))
            self._set_factors(A0, B0)
            return Q.to(weight.dtype)
        if init == "olora":
            A0, B0 = lora_inits.olora(W, self.r)
        elif init.startswith("corda"):
            A0, B0 = lora_inits.corda(W, stats.mean(self.site_name), self.r, s, kpm=init == "corda_kpm")
        else:
            A0, B0 = lora_inits.pissa(W, self.r, s, int(niter.group(1)) if niter else None)
        self._set_factors(A0, B0)
        return (W - s * (self.init_B.float() @ self.init_A.float())).to(weight.dtype)

    def base_offset(self) -> LowRank | None:
        """The offset of :class:`OffsetFactors`; None for LoftQ, whose base is the quantized W (no low-rank
        offset: the adapter belongs with that base, as in PEFT)."""
        return None if self.config["init"] == "loftq" else super().base_offset()


class EvaLoRA(DataDependentInit, LoRA):
    """``lora(init="eva")``: EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv:2410.07170),
    as PEFT's ``get_eva_state_dict`` with ``rho=1``: A = the top-r principal components of the site's
    input rows (incremental PCA streamed over ``data`` until every component is stable, cosine ≥ 0.99;
    :class:`~lowrank_compiler.methods.gradstats.InputPCA`), B = 0. The base is not moved. Not done:
    PEFT's rank redistribution across sites (``rho > 1``), since an lrc site's rank is fixed by the
    spec; ``whiten``. A = B = 0 until ``passes.initialize`` runs (no loss_fn needed: forward only).
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)
    identity_before_init = True

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def reset_parameters(self) -> None:
        """A = B = 0 until initialize(): the branch is exactly zero and no RNG is consumed."""
        nn.init.zeros_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def init_stats(self, device: torch.device | None = None) -> InputPCA:
        return InputPCA(self.r)

    def initialize(self, stats: InputPCA, weight: torch.Tensor) -> None:
        """A ← the top-r components; B stays 0, the base is unchanged."""
        with torch.no_grad():
            self.lora_A.copy_(stats.top(self.site_name))
            self.initialized.fill_(True)
        return None
