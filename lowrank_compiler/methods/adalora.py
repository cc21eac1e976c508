"""AdaLoRA: SVD-form adapters whose rank budget is re-allocated across sites while training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compiler.errors import SpecError
from lowrank_compiler.methods.args import Arg, non_negative, positive, probability
from lowrank_compiler.methods.base import AdapterMethod, LowRank, SiteInfo, StepContext, register_method

#: args that define one shared budget pool (adapters agreeing on all of them are allocated together)
SCHEDULE = ("tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg", "total_step", "step_from", "orth_in_loss")


def _beta(v: Any) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def _zero_or_one(v: Any) -> str | None:
    return None if v in (0, 1) else "must be 0 (the authors' and PEFT's loops) or 1"


def orth_loss(adapters: Iterable[Any]) -> torch.Tensor | None:
    """The regulariser R of every AdaLoRA pool with ``orth_in_loss=True`` among ``adapters`` (e.g.
    ``lrc.adapters(gm).values()``), to add to the loss before ``backward()`` — then gradient clipping
    sees it, as in the authors' trainer and PEFT. Per pool: ``orth_reg · mean over its P and Q matrices
    of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F``. None when no pool asks for it."""
    total = None
    for pool in AdaLoRA._pools(list(adapters)):
        if pool[0].config["orth_in_loss"] and float(pool[0].config["orth_reg"]) > 0:
            r = sum(a.loss_terms() for a in pool) / len(pool)
            total = r if total is None else total + r.to(total.device)
    return total


@register_method
class AdaLoRA(AdapterMethod):
    """AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al. 2023,
    arXiv:2303.10512), checked against PEFT's ``AdaLoraModel``/``RankAllocator`` (same names, shapes,
    scores and schedule, so tensors move 1:1).

    ``ΔW = s·P diag(λ) Q`` with Q = ``lora_A`` (r × d_in), P = ``lora_B`` (d_out × r), λ = ``lora_E``
    (r × 1), ``s = alpha / init_r``; λ = 0, P, Q ~ N(0, 0.02²). The training pass (``lrc.optimizer``)
    owns the whole schedule inside ``opt.step()``; the user's loop is the LoRA loop:
    * orthogonality regulariser ``R = orth_reg · mean over all P, Q matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F``
      (the authors' ``compute_orth_regu`` and PEFT's). With ``orth_in_loss=False`` (default) its gradient
      ``orth_reg/(2N) · 2P(PᵀP − I)/‖PᵀP − I‖_F`` (and likewise for Q) is added to ``.grad`` before the
      base step, which equals adding R to the loss — except that gradient clipping does not see it.
      With ``orth_in_loss=True`` lrc adds nothing and the user adds ``lrc.training.orth_loss(lrc.adapters(gm).values())``
      to the loss, as the authors' trainer and PEFT do (clipped, then scored).
    * after the step, while t < total_step − tfinal: sensitivity ``I = |w·∇w|`` for P, λ, Q, EMAs
      ``Ī ← β1 Ī + (1−β1) I``, ``Ū ← β2 Ū + (1−β2)|I − Ī|``, score ``Ī·Ū``; triplet score
      ``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.
    * cubic budget ``b(t) = int((b0 − bT)(1 − (t − tinit)/(T − tfinal − tinit))³ + bT)`` over all
      adapters of the pool (b0 = Σ init_r, bT = Σ target_r); every ``deltaT`` steps after ``tinit``
      the λ_i with ``S_i`` ≤ the (b0 − b)-th smallest score are set to 0 (P, Q kept: ranks may
      revive); at t = T − tfinal the final mask is fixed (``rank_mask``) and re-applied every later step.
    t numbers this pool's optimizer steps from ``step_from`` (buffer ``steps`` counts them): 0 by default,
    as the authors' trainer (``update_and_mask(model, self.state.global_step)`` runs before
    ``global_step += 1``) and PEFT's examples call it, so a config means what it means there; 1 is
    lrc's numbering before issue 24 (every phase one step earlier). All schedule state is in buffers,
    so a saved and re-loaded model continues the same schedule. Merge and export drop ranks with λ_i = 0.

    Args:
        init_r (int, 12): starting rank per site.  target_r (int, 8): average final rank per site.
        alpha (float, 8): scaling numerator (s = alpha / init_r).  dropout (float, 0.0).
        total_step (int, required): T, the planned number of optimizer steps.
        tinit (int, 0), tfinal (int, 0), deltaT (int, 1): schedule (PEFT's names and defaults).
        beta1 (float, 0.85), beta2 (float, 0.85): EMA factors.  orth_reg (float, 0.5): γ (PEFT's default;
        the authors' scripts use 0.1).  orth_in_loss (bool, False): the user adds R to the loss.
        step_from (int, 0): the number t of the first optimizer step (0 or 1).

    Raises:
        SpecError: total_step missing, target_r > init_r, or no budgeting phase (tinit ≥ T − tfinal).
    """

    name = "adalora"
    args = {
        "init_r": Arg(12, (int,), positive, "initial rank"),
        "target_r": Arg(8, (int,), positive, "average target rank"),
        "alpha": Arg(8.0, (float,), positive, "scaling numerator"),
        "dropout": Arg(0.0, (float,), probability, "dropout on the adapter input"),
        "total_step": Arg(None, (int,), positive, "the planned number of optimizer steps", required=True),
        "tinit": Arg(0, (int,), non_negative, "steps before the budget starts to fall"),
        "tfinal": Arg(0, (int,), non_negative, "final steps at the target budget"),
        "deltaT": Arg(1, (int,), positive, "steps between two maskings"),
        "beta1": Arg(0.85, (float,), _beta, "EMA factor of the sensitivity"),
        "beta2": Arg(0.85, (float,), _beta, "EMA factor of the uncertainty"),
        "orth_reg": Arg(0.5, (float,), non_negative, "weight of the orthogonality regulariser"),
        "orth_in_loss": Arg(False, (bool,), None, "the user adds orth_loss(...) to the loss (clipping sees it)"),
        "step_from": Arg(0, (int,), _zero_or_one, "number of the first step: 0 (authors, PEFT) or 1"),
    }

    @classmethod
    def resolve_args(cls, given: dict[str, Any]) -> dict[str, Any]:
        out = super().resolve_args(given)
        if out["target_r"] > out["init_r"]:
            raise SpecError(f"adalora: target_r={out['target_r']} must be <= init_r={out['init_r']}")
        if out["tinit"] >= out["total_step"] - out["tfinal"]:
            raise SpecError(f"adalora: tinit={out['tinit']} >= total_step - tfinal = "
                            f"{out['total_step'] - out['tfinal']} leaves no budgeting phase; lower tinit/tfinal "
                            "or raise total_step")
        return out

    @classmethod
    def check_site(cls, args: dict[str, Any], site: SiteInfo) -> str | None:
        r = args.get("init_r", 12)
        if isinstance(r, int) and r > min(site.d_in, site.d_out):
            return (f"adalora: init_r={r} is larger than min(d_in, d_out)={min(site.d_in, site.d_out)} "
                    f"of site {site.name!r} ({site.d_out}x{site.d_in})")
        return None

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        cfg = self.config
        self.r, self.target_r = int(cfg["init_r"]), int(cfg["target_r"])
        self.scaling = float(cfg["alpha"]) / self.r
        self.lora_A = nn.Parameter(torch.randn(self.r, site.d_in, dtype=site.dtype) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(self.r, 1, dtype=site.dtype))
        self.lora_B = nn.Parameter(torch.randn(site.d_out, self.r, dtype=site.dtype) * 0.02)
        self.lora_dropout = nn.Dropout(cfg["dropout"]) if cfg["dropout"] > 0 else nn.Identity()
        for n in ("A", "E", "B"):
            p = getattr(self, f"lora_{n}")
            self.register_buffer(f"ipt_{n}", torch.zeros(p.shape, dtype=torch.float32))
            self.register_buffer(f"unc_{n}", torch.zeros(p.shape, dtype=torch.float32))
        self.register_buffer("rank_mask", torch.ones(self.r, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    # -- forward / merge --------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        if self.passthrough:
            return out
        h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A * self.lora_E)
        return out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scaling

    def kept(self) -> torch.Tensor:
        """Indices of the ranks that contribute (λ_i ≠ 0)."""
        return (self.lora_E.detach().view(-1) != 0).nonzero().view(-1)

    def low_rank_factors(self) -> LowRank | None:
        """Only the unmasked ranks: A = diag(λ_kept) Q_kept, B = P_kept (a zero rank-1 pair if none is left)."""
        k = self.kept()
        if k.numel() == 0:
            return LowRank(self.lora_A.detach()[:1] * 0, self.lora_B.detach()[:, :1] * 0, self.scaling)
        a = self.lora_A.detach()[k] * self.lora_E.detach()[k]
        return LowRank(a, self.lora_B.detach()[:, k], self.scaling)

    def final_rank(self) -> int:
        return int(self.kept().numel())

    # -- regulariser --------------------------------------------------------
    def orth_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖PᵀP − I‖_F, ‖QQᵀ − I‖_F) as differentiable fp32 scalars."""
        eye = torch.eye(self.r, device=self.lora_A.device)
        p, q = self.lora_B.float(), self.lora_A.float()
        return torch.linalg.matrix_norm(p.t() @ p - eye), torch.linalg.matrix_norm(q @ q.t() - eye)

    def loss_terms(self) -> torch.Tensor | None:
        """This site's share of the regulariser, γ/2 · (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F) (the pool's R is the
        mean of these over its adapters); the training pass adds its gradient itself."""
        gamma = float(self.config["orth_reg"])
        return None if gamma == 0 else gamma / 2 * sum(self.orth_terms())

    @torch.no_grad()
    def _add_orth_grad(self, weight: float) -> None:
        eye = torch.eye(self.r, device=self.lora_A.device)
        for p, left in ((self.lora_B, True), (self.lora_A, False)):
            w = p.detach().float()
            e = (w.t() @ w if left else w @ w.t()) - eye
            n = torch.linalg.matrix_norm(e)
            if float(n) == 0.0:
                continue
            g = (2 * weight / n) * (w @ e if left else e @ w)
            p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g.to(p.grad.dtype))

    # -- schedule --------------------------------------------------------------
    def budget_schedule(self, pool: list[AdaLoRA], t: int) -> tuple[int, bool]:
        """(budget, mask now?) at step t for the pool (PEFT ``RankAllocator.budget_schedule``)."""
        c = self.config
        b0, bT = sum(a.r for a in pool), sum(a.target_r for a in pool)
        tinit, tfinal, total = int(c["tinit"]), int(c["tfinal"]), int(c["total_step"])
        if t <= tinit:
            return b0, False
        if t > total - tfinal:
            return bT, True
        mul = 1 - (t - tinit) / (total - tfinal - tinit)
        return int((b0 - bT) * mul**3 + bT), t % int(c["deltaT"]) == 0

    @torch.no_grad()
    def _update_scores(self) -> None:
        b1, b2 = float(self.config["beta1"]), float(self.config["beta2"])
        for n in ("A", "E", "B"):
            p = getattr(self, f"lora_{n}")
            ipt = (p.float() * p.grad.float()).abs() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            avg, unc = getattr(self, f"ipt_{n}"), getattr(self, f"unc_{n}")
            avg.mul_(b1).add_((1 - b1) * ipt)
            unc.mul_(b2).add_((1 - b2) * (ipt - avg).abs())

    def triplet_scores(self) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ī·Ū (r,)."""
        s_e = (self.ipt_E * self.unc_E).view(-1)
        s_a = (self.ipt_A * self.unc_A).mean(dim=1)
        s_b = (self.ipt_B * self.unc_B).mean(dim=0)
        return s_e + s_a + s_b

    @staticmethod
    @torch.no_grad()
    def mask_to_budget(pool: list[AdaLoRA], budget: int) -> None:
        """Zero λ_i of every triplet whose score is ≤ the (b0 − budget)-th smallest score of the pool."""
        scores = [a.triplet_scores() for a in pool]
        k = sum(a.r for a in pool) - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat([s.to(scores[0].device) for s in scores]), k)[0]
        for a, s in zip(pool, scores):
            keep = s > threshold.to(s.device)
            a.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            a.rank_mask.copy_(keep)

    @classmethod
    def _pools(cls, adapters: list[AdapterMethod]) -> list[list[AdaLoRA]]:
        pools: dict[tuple, list[AdaLoRA]] = {}
        for a in adapters:
            if isinstance(a, AdaLoRA) and not a.passthrough:
                pools.setdefault(tuple(a.config[k] for k in SCHEDULE), []).append(a)
        return list(pools.values())

    @classmethod
    def before_step_all(cls, adapters: list[AdapterMethod], ctx: StepContext) -> None:
        for pool in cls._pools(adapters):
            gamma = float(pool[0].config["orth_reg"])
            if gamma > 0 and not pool[0].config["orth_in_loss"]:
                for a in pool:
                    a._add_orth_grad(gamma / (2 * len(pool)))

    @classmethod
    @torch.no_grad()
    def after_step_all(cls, adapters: list[AdapterMethod], ctx: StepContext) -> None:
        for pool in cls._pools(adapters):
            head = pool[0]
            done = int(head.steps) + 1
            for a in pool:
                a.steps.fill_(done)
            t = done - 1 + int(head.config["step_from"])
            final = int(head.config["total_step"]) - int(head.config["tfinal"])
            if t < final:
                for a in pool:
                    a._update_scores()
                budget, now = head.budget_schedule(pool, t)
                if now:
                    cls.mask_to_budget(pool, budget)
            elif t == final:
                cls.mask_to_budget(pool, head.budget_schedule(pool, t)[0])
                for a in pool:
                    for n in ("A", "E", "B"):
                        getattr(a, f"ipt_{n}").zero_()
                        getattr(a, f"unc_{n}").zero_()
            else:
                for a in pool:
                    a.lora_E.masked_fill_(~a.rank_mask.view(-1, 1), 0.0)
