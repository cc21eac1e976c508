"""Adapters re-expressed against the ORIGINAL base weights (for LoRA-GA, whose init offsets W)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import adapters_of as adapters


def original_base_pairs(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{site: (A, B, s)}`` such that ``W_original + s·B A`` is the adapted weight, for every LoRA-like adapter.

    LoRA-GA adapters give the rank-2r pair A' = [A; A0], B' = [B, −B0]; adapters that never touched the
    base (plain LoRA) give (A, B) as they are (``AdapterMethod.original_base_factors``).

    Raises:
        ExportError: an adapter has no low-rank (A, B) form, or changed the base without an
        known low-rank offset to undo it.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for site, mod in adapters(gm).items():
        f = mod.original_base_factors()
        if f is None:
            raise ExportError(f"site {site!r}: method {mod.name!r} has no (A, B) form against the original base")
        out[site] = (f.A.float(), f.B.float(), float(f.scale))
    return out


def original_base_peft(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(PEFT LoRA state dict, ``LoraConfig`` kwargs) that reproduce ``gm`` on the UNMODIFIED base model.

    Load with ``get_peft_model(original_model, LoraConfig(**kwargs))`` and
    ``set_peft_model_state_dict(peft_model, state)``. Ranks and alphas are per site
    (``rank_pattern``/``alpha_pattern``; alpha = s·rank so PEFT's alpha/rank is our s). The other
    export, ``lrc.save``/``save_adapters``, is the default: it ships the offset base and rank-r adapters.
    """
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for site, (A, B, s) in original_base_pairs(gm).items():
        state[f"base_model.model.{site}.lora_A.weight"] = A.contiguous()
        state[f"base_model.model.{site}.lora_B.weight"] = B.contiguous()
        ranks[site], alphas[site] = A.shape[0], s * A.shape[0]
    if not ranks:
        raise ExportError("the model has no adapters to export")
    r0 = next(iter(ranks.values()))
    kwargs = {"r": r0, "lora_alpha": alphas[next(iter(alphas))], "target_modules": sorted(ranks),
              "rank_pattern": ranks, "alpha_pattern": alphas, "lora_dropout": 0.0, "use_rslora": False}
    return state, kwargs
