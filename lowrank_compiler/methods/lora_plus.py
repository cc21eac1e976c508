"""LoRA+: LoRA with learning rate lr_B = ratio · lr_A."""

from __future__ import annotations

from typing import Any

from lowrank_compiler.methods.args import Arg, positive
from lowrank_compiler.methods.base import SiteInfo, register_method
from lowrank_compiler.methods.lora import LORA_ARGS, LoRA


@register_method
class LoRAPlus(LoRA):
    """LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh, Yu 2024, arXiv:2402.12354).

    Same forward, init and merge as LoRA; only the optimizer groups differ: ``lora_B`` (and any
    1-D trainable, as in PEFT ``create_loraplus_optimizer``) gets ``ratio · lr``, ``lora_A`` gets
    ``lr``. Choice: ratio default 16 (the authors' scripts use 10–80; PEFT has no default).

    Args:
        r (int, 8), alpha (float, 8), dropout (float, 0.0), rslora (bool, false): as LoRA.
        ratio (float, 16): lr_B / lr_A, > 0.

    Raises:
        SpecError: ratio ≤ 0, or a LoRA argument out of range.
    """

    name = "lora_plus"
    args = {**LORA_ARGS, "ratio": Arg(16.0, (float,), positive, "lr_B / lr_A")}

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        self.ratio = float(kwargs["ratio"])

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        fast = [p for n, p in self.named_parameters() if p.requires_grad and ("lora_B" in n or p.dim() == 1)]
        slow = [p for n, p in self.named_parameters() if p.requires_grad and not ("lora_B" in n or p.dim() == 1)]
        return [g for g in ({"params": slow, "lr": lr}, {"params": fast, "lr": lr * self.ratio}) if g["params"]]
