"""LoRASC: slow cascade learning — periodic merge of the fast LoRA into the backbone, then a fresh LoRA."""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import torch

from lowrank_compiler.errors import SpecError
from lowrank_compiler.methods.args import Arg, non_negative, positive
from lowrank_compiler.methods.base import SiteInfo, StepContext, register_method
from lowrank_compiler.methods.lora import LORA_ARGS, LoRA


def _unit_interval(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


@register_method
class LoRASC(LoRA):
    """LoRASC: Expressive and Generalizable Low-rank Adaptation for Large Models via Slow Cascaded
    Learning (Li et al. 2024, arXiv:2407.01491). No code is published; the choices are ours.

    Forward/init/merge as LoRA (the "fast" LoRA). Every ``cascade_every`` optimizer steps:
      1. slow-fast update + merge: ``W ← W + slow_rate · s·B A`` (the slow LoRA is the accumulated
         merged update; with ``slow_rate < 1`` only that share of the fast LoRA's progress is kept,
         Lookahead-style);
      2. cascading noisy tuning: ``W ← W + noise · std(W) · U(−½, ½)`` (NoisyTune), drawn from a
         generator seeded by (seed, site, cascade index) so runs and resumes are reproducible;
      3. re-init the fast LoRA (A kaiming-uniform from that generator, B = 0) and clear its
         optimizer state (a fresh LoRA gets fresh Adam moments).
    Each cascade adds up to rank r to the merged update (a mixture of low-rank updates) and adds
    no inference cost: at the end the fast LoRA merges like LoRA. With ``slow_rate=1`` and
    ``noise=0`` the output is continuous across a cascade. The cascade count is the buffer
    ``cascades`` (saved with the adapter).

    Args:
        r (int, 8), alpha (float, 8), dropout (float, 0.0), rslora (bool, false): as LoRA.
        cascade_every (int, required): K, optimizer steps per cascade (e.g. one epoch's steps).
        slow_rate (float, 1.0): α in (0, 1], share of the fast LoRA merged at each cascade.
        noise (float, 0.0): λ ≥ 0, NoisyTune strength added to the backbone at each cascade.
        seed (int, 0): seed of the re-init and the noise.

    Raises:
        SpecError: cascade_every missing or < 1, slow_rate outside (0, 1], noise < 0.
    """

    fp32_master = False  # adapter tensors in the base dtype (fp32 masters are verified for lora / lora_plus)
    name = "lorasc"
    args = {
        **LORA_ARGS,
        "cascade_every": Arg(None, (int,), positive, "optimizer steps per cascade", required=True),
        "slow_rate": Arg(1.0, (float,), _unit_interval, "share of the fast LoRA merged per cascade"),
        "noise": Arg(0.0, (float,), non_negative, "NoisyTune strength per cascade"),
        "seed": Arg(0, (int,), non_negative, "seed of the re-init and noise"),
    }
    modifies_base: ClassVar[bool] = True

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        if kwargs.get("cascade_every") is None:
            raise SpecError("lorasc: argument cascade_every is required")
        self.every, self.slow_rate = int(kwargs["cascade_every"]), float(kwargs["slow_rate"])
        self.noise, self.seed = float(kwargs["noise"]), int(kwargs["seed"])
        self.register_buffer("cascades", torch.zeros((), dtype=torch.int64))

    def _generator(self) -> torch.Generator:
        key = f"{self.seed}/{self.site_name}/{int(self.cascades)}".encode()
        return torch.Generator(device="cpu").manual_seed(zlib.crc32(key))

    @torch.no_grad()
    def after_step(self, weight: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        if ctx.step % self.every:
            return None
        gen = self._generator()
        new = weight.float() + self.slow_rate * self.delta_weight(weight)
        if self.noise > 0:
            u = torch.rand(new.shape, generator=gen) - 0.5
            new += self.noise * weight.float().std() * u.to(new.device)
        bound = 1.0 / math.sqrt(self.d_in)  # kaiming_uniform(a=√5) on an r × d_in matrix, as LoRA/PEFT
        self.lora_A.copy_((torch.rand(self.lora_A.shape, generator=gen) * 2 - 1) * bound)
        self.lora_B.zero_()
        for p in (self.lora_A, self.lora_B):
            ctx.state(p).clear()
        self.cascades += 1
        return new
