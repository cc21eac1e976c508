"""ALoRA: gated LoRA ranks, pruned by ablation importance and re-allocated across sites while training."""

from __future__ import annotations

import math
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowrank_compiler.errors import LrcError, SpecError
from lowrank_compiler.methods.args import Arg, non_negative, positive
from lowrank_compiler.methods.base import AdapterMethod, LowRank, SiteInfo, StepContext, register_method


@register_method
class ALoRA(AdapterMethod):
    """ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language Models (Liu et al. 2024,
    arXiv:2403.16187), from the paper text (no code checked).

    ``ΔW = s·B diag(g) A`` with gates g ∈ {0, 1} (buffer ``gate``), A (r_max × d_in) kaiming-uniform,
    B (d_out × r_max) zeros, s = alpha / r; the first ``r`` slots start active, the rest are room for
    re-allocated ranks. AB-LoRA importance of an active rank k on a validation batch (S = −loss):
    ``IS(k) = S(M) − S(M without k) + S(M with only k)`` ("only k": every other ALoRA rank of the model
    gated off). Every ``every`` optimizer steps, up to ``rounds`` times, inside ``opt.step()``: the
    ``prune_per_round`` ranks with the lowest IS (over all ALoRA sites) are gated off, and as many new
    ranks are given to the sites that lost none, most important site first (sum of its IS), one each
    in turn, into free slots. Decided here: a new rank is initialized like LoRA (A row kaiming from
    ``seed``, B column 0, so the output is continuous) and its optimizer moments are zeroed; when no
    site that lost none has room, the rank goes to the most important site with room (so the total
    active rank is always conserved). A pruned rank contributes exactly zero (gate 0, B column
    zeroed). Merge and export keep only the active ranks.

    The validation batch is bound once with :func:`set_validation` (``gm(*batch)``/``gm(**batch)``
    and ``loss_fn(output, batch) -> scalar``); the user's loop is otherwise the LoRA loop.

    Args:
        r (int, 8): active ranks per site at the start.  r_max (int, 0 = 2r): slots per site.
        alpha (float, 8): scaling numerator (s = alpha / r).
        every (int, 100): optimizer steps between rounds.  rounds (int, 8): number of rounds.
        prune_per_round (int, 1): ranks pruned (and re-allocated) per round.
        seed (int, 0): seed of the re-allocated ranks' init.

    Raises:
        SpecError: r_max < r, or a site too small.  LrcError: a round is due and no validation batch is set.
    """

    name = "alora"
    args = {
        "r": Arg(8, (int,), positive, "active ranks per site at the start"),
        "r_max": Arg(0, (int,), non_negative, "rank slots per site (0 = 2r)"),
        "alpha": Arg(8.0, (float,), positive, "scaling numerator"),
        "every": Arg(100, (int,), positive, "optimizer steps between rounds"),
        "rounds": Arg(8, (int,), non_negative, "pruning rounds"),
        "prune_per_round": Arg(1, (int,), positive, "ranks pruned and re-allocated per round"),
        "seed": Arg(0, (int,), None, "seed of re-allocated ranks"),
    }

    @classmethod
    def resolve_args(cls, given: dict[str, Any]) -> dict[str, Any]:
        out = super().resolve_args(given)
        if out["r_max"] and out["r_max"] < out["r"]:
            raise SpecError(f"alora: r_max={out['r_max']} must be >= r={out['r']} (or 0 for 2r)")
        return out

    @classmethod
    def check_site(cls, args: dict[str, Any], site: SiteInfo) -> str | None:
        r = args.get("r", 8)
        cap = args.get("r_max") or 2 * r
        if min(cap, r) > min(site.d_in, site.d_out):
            return (f"alora: r={r} is larger than min(d_in, d_out)={min(site.d_in, site.d_out)} "
                    f"of site {site.name!r} ({site.d_out}x{site.d_in})")
        if cap > 2 * min(site.d_in, site.d_out):  # bounded before anything is allocated
            return (f"alora: r_max={cap} is larger than 2·min(d_in, d_out)={2 * min(site.d_in, site.d_out)} "
                    f"of site {site.name!r} ({site.d_out}x{site.d_in})")
        return None

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        cfg = self.config
        self.r = int(cfg["r"])
        self.r_max = int(cfg["r_max"]) or 2 * self.r
        self.scaling = float(cfg["alpha"]) / self.r
        self.lora_A = nn.Parameter(torch.empty(self.r_max, site.d_in, dtype=site.dtype))
        self.lora_B = nn.Parameter(torch.zeros(site.d_out, self.r_max, dtype=site.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        gate = torch.zeros(self.r_max, dtype=site.dtype)
        gate[: self.r] = 1
        self.register_buffer("gate", gate)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("rounds_done", torch.zeros((), dtype=torch.int64))
        self._validation: tuple[weakref.ref, Any, Callable] | None = None

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        if self.passthrough:
            return out
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.gate
        return out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)

    def active(self) -> torch.Tensor:
        return self.gate.nonzero().view(-1)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.float() * self.gate.float()) @ self.lora_A.float() * self.scaling

    def low_rank_factors(self) -> LowRank | None:
        k = self.active()
        return LowRank(self.lora_A.detach()[k], self.lora_B.detach()[:, k], self.scaling)

    def final_rank(self) -> int:
        return int(self.active().numel())

    # -- the rounds ----------------------------------------------------------------
    @torch.no_grad()
    def _new_rank(self, k: int, ctx: StepContext | None) -> None:
        key = f"{self.config['seed']}/{self.site_name}/{int(self.rounds_done)}/{k}".encode()
        g = torch.Generator().manual_seed(zlib.crc32(key))
        row = (torch.rand(self.d_in, generator=g) * 2 - 1) / math.sqrt(self.d_in)
        self.lora_A[k] = row.to(self.lora_A)
        self.lora_B[:, k] = 0
        self.gate[k] = 1
        if ctx is not None:
            for p, index in ((self.lora_A, (k,)), (self.lora_B, (slice(None), k))):
                for v in ctx.state(p).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v[index] = 0

    @torch.no_grad()
    def _prune(self, k: int) -> None:
        self.gate[k] = 0
        self.lora_B[:, k] = 0

    @classmethod
    def after_step_all(cls, adapters: list[AdapterMethod], ctx: StepContext) -> None:
        ads = [a for a in adapters if isinstance(a, ALoRA) and not a.passthrough]
        if not ads:
            return
        head = ads[0]
        t = int(head.steps) + 1
        for a in ads:
            a.steps.fill_(t)
        if t % int(head.config["every"]) or int(head.rounds_done) >= int(head.config["rounds"]):
            return
        bound = next((a._validation for a in ads if a._validation is not None), None)
        gm = bound[0]() if bound is not None else None
        if gm is None:
            raise LrcError("alora: a pruning round is due at step "
                           f"{t} but no validation batch is set; call lowrank_compiler.methods.alora."
                           "set_validation(gm, batch, loss_fn) once before training")
        reallocate(gm, bound[1], bound[2], int(head.config["prune_per_round"]), ctx)


def _aloras(gm: nn.Module) -> dict[str, ALoRA]:
    """``{site: adapter}`` for every ALoRA adapter in ``gm`` (each shared module once)."""
    return {m.site_name: m for m in gm.modules() if isinstance(m, ALoRA)}


def set_validation(gm: fx.GraphModule, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
    """Bind the validation batch and loss that ALoRA's rounds (run inside ``opt.step()``) score ranks on."""
    ads = list(_aloras(gm).values())
    if not ads:
        raise LrcError("set_validation: the graph has no alora adapters")
    for a in ads:
        a._validation = (weakref.ref(gm), batch, loss_fn)


def _score(gm: fx.GraphModule, batch: Any, loss_fn: Callable) -> float:
    out = gm(**batch) if isinstance(batch, dict) else gm(*batch) if isinstance(batch, (tuple, list)) else gm(batch)
    return -float(loss_fn(out, batch))


@torch.no_grad()
def importance(gm: fx.GraphModule, batch: Any, loss_fn: Callable) -> dict[tuple[str, int], float]:
    """``{(site, slot): IS}`` for every active ALoRA rank: S(M) − S(M without k) + S(M with only k)."""
    ads = _aloras(gm)
    was = gm.training
    gm.eval()
    saved = {s: a.gate.clone() for s, a in ads.items()}
    try:
        full = _score(gm, batch, loss_fn)
        out: dict[tuple[str, int], float] = {}
        for s, a in ads.items():
            for k in a.active().tolist():
                a.gate[k] = 0
                without = _score(gm, batch, loss_fn)
                for b in ads.values():
                    b.gate.zero_()
                a.gate[k] = 1
                only = _score(gm, batch, loss_fn)
                for s2, b in ads.items():
                    b.gate.copy_(saved[s2])
                out[(s, k)] = full - without + only
    finally:
        for s, a in ads.items():
            a.gate.copy_(saved[s])
        gm.train(was)
    return out


@torch.no_grad()
def reallocate(gm: fx.GraphModule, batch: Any, loss_fn: Callable, n: int,
               ctx: StepContext | None = None) -> dict[str, list[tuple[str, int]]]:
    """One ALoRA round: prune the ``n`` active ranks of lowest importance, give ``n`` new ranks to the
    sites that lost none. Returns ``{"pruned": [(site, slot)], "added": [(site, slot)]}``."""
    ads = _aloras(gm)
    scores = importance(gm, batch, loss_fn)
    n = min(n, max(len(scores) - 1, 0))
    pruned = sorted(scores, key=lambda sk: scores[sk])[:n]
    for s, k in pruned:
        ads[s]._prune(k)
    site_score = {s: sum(v for (s2, _), v in scores.items() if s2 == s) for s in ads}
    lost = {s for s, _ in pruned}
    order = sorted(ads, key=lambda s: -site_score[s])
    eligible = [s for s in order if s not in lost] or order
    added: list[tuple[str, int]] = []
    i = 0
    while len(added) < len(pruned):
        free = [s for s in eligible if (ads[s].gate == 0).any()]
        if not free:  # no site that lost none has room: the most important site with room
            eligible = free = [s for s in order if (ads[s].gate == 0).any()]
        s = free[i % len(free)]
        k = int((ads[s].gate == 0).nonzero()[0])
        ads[s]._new_rank(k, ctx)
        added.append((s, k))
        i += 1
    for a in ads.values():
        a.rounds_done += 1
    return {"pruned": pruned, "added": added}
