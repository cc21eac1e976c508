"""PEFT-format LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import fx

from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import META_KEY, adapter_nodes, lrc_meta
from lowrank_compiler.passes.full import full_parameters
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety.atomic import atomic_dir

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
KEY_RE = re.compile(r"^(?P<site>.+)\.(?P<which>lora_A|lora_B|lora_E|lora_magnitude_vector|vera_lambda_b|vera_lambda_d)"
                     r"(?:\.default)?(?:\.weight)?$")
#: tensors each kind of PEFT adapter holds per site (PEFT's names, which are also lrc's module attributes)
KIND_TENSORS = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
                "adalora": ("lora_A", "lora_B", "lora_E"), "vera": ("vera_lambda_b", "vera_lambda_d")}
#: VeRA's shared projections (``save_projection=True``), stored once under these keys
VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")


def _dora_state(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """``{site: (A, B, m)}`` when the model's adapters are DoRA (PEFT ``use_dora``), None when none is.

    Raises:
        ExportError: DoRA mixed with other methods (``use_dora`` is one switch for the whole directory),
        or a merged DoRA site (its base is W', not W).
    """
    nodes = [(n.meta[META_KEY], gm.get_submodule(n.meta[META_KEY].module_path)) for n in adapter_nodes(gm)]
    dora = [(mark, m) for mark, m in nodes if mark.method == "dora"]
    if not dora:
        return None
    if len(dora) != len(nodes):
        other = sorted({mark.method for mark, _ in nodes} - {"dora"})
        raise ExportError(f"PEFT's use_dora applies to every site of a directory; this model mixes dora with "
                          f"{other}: export the two kinds separately or in lrc format")
    merged = [mark.site for mark, m in dora if m.merged]
    if merged:
        raise ExportError(f"DoRA sites {merged[:4]} are merged; lrc.unmerge(gm) before a PEFT export")
    return {mark.site: (m.lora_A.detach(), m.lora_B.detach(), m.lora_magnitude_vector.detach()) for mark, m in dora}


def peft_state(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors with PEFT key names, adapter_config dict) for the LoRA-family adapters of ``gm``.

    Per-site ranks/scales go to PEFT's ``rank_pattern``/``alpha_pattern`` (keys are full module paths).
    Modules a ``full`` rule trains go to ``modules_to_save`` (their tensors as ``base_model.model.<path>.<name>``,
    which PEFT loads into its trainable copy).

    DoRA models are written with ``use_dora`` and each site's ``lora_magnitude_vector``.

    Raises:
        ExportError: a method PEFT's LoRA cannot express (one that changed the base weight in a way that is
        not a known low-rank offset (Delta-LoRA, LoRASC), FLoRA), or DoRA mixed with other methods.
        LoRA-GA is written as its rank-2r pair against the original base (``original_base_factors``).
    """
    sites: list[tuple[str, torch.Tensor, torch.Tensor, float, dict[str, Any], str]] = []
    bad = []
    dora = _dora_state(gm)
    for node in adapter_nodes(gm):
        mark = node.meta[META_KEY]
        m = gm.get_submodule(mark.module_path)
        f = m.original_base_factors() if dora is None else (dora[mark.site][0], dora[mark.site][1], m.scaling)
        if f is None:
            bad.append((mark.site, mark.method))
            continue
        a, b, s = f
        sites.append((mark.site, a.detach(), b.detach(), float(s), dict(m.config), mark.layout))
    if bad:
        raise ExportError(f"PEFT format holds LoRA-form adapters (base weights unchanged, y = Wx + s·B·A·x) and "
                          f"DoRA only; sites {bad[:4]} use other methods; export merged or in lrc format instead")
    if not sites:
        raise ExportError("the model has no adapters to write in PEFT format")
    rslora = all(c.get("rslora", False) for *_, c, _ in sites)

    def alpha_of(r: int, s: float, c: dict[str, Any]) -> float:
        # the spec's alpha when it gives this scale at this rank, else derived from the scale (AdaLoRA/ALoRA
        # factors have fewer ranks than their spec's r: s = alpha / r_spec ≠ alpha / r_exported)
        derived = s * (r ** 0.5 if rslora else r)
        given = c.get("alpha")
        same = given is not None and bool(c.get("rslora", False)) == rslora
        return float(given) if same and abs(float(given) - derived) <= 1e-6 * abs(derived) else derived

    ranks = Counter(a.shape[0] for _, a, *_ in sites)
    r0 = ranks.most_common(1)[0][0]
    alphas = Counter(alpha_of(a.shape[0], s, c) for _, a, _, s, c, _ in sites)
    alpha0 = alphas.most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for site, a, b, s, c, _ in sites:
        tensors[f"{PREFIX}{site}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"{PREFIX}{site}.lora_B.weight"] = b.contiguous().clone()
        if dora is not None:
            tensors[f"{PREFIX}{site}.lora_magnitude_vector"] = dora[site][2].contiguous().clone()
        if a.shape[0] != r0:
            rank_pattern[site] = int(a.shape[0])
        if alpha_of(a.shape[0], s, c) != alpha0:
            alpha_pattern[site] = alpha_of(a.shape[0], s, c)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": lrc_meta(gm).get("base_model_name_or_path"),
        "inference_mode": True, "r": int(r0), "lora_alpha": alpha0, "use_rslora": rslora,
        "lora_dropout": float(sites[0][4].get("dropout", 0.0)),
        "target_modules": sorted(s[0] for s in sites), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": all(s[5] == "conv1d" for s in sites), "bias": "none",
        "modules_to_save": list(lrc_meta(gm).get("full_modules", [])) or None,
        "init_lora_weights": True, "use_dora": dora is not None, "lora_bias": False, "layers_to_transform": None,
        "layers_pattern": None,
    }
    for key, t in full_parameters(gm).items():
        tensors[f"{PREFIX}{key}"] = t.detach().contiguous().clone()
    return tensors, config


@quiet
def save_peft(gm: fx.GraphModule, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write a PEFT adapter directory that ``peft.PeftModel.from_pretrained(original_model, path)`` loads.

    Both files are written to a temp dir that replaces ``path`` in one rename (other files in an
    existing ``path`` are carried over); concurrent writers never mix one's weights with another's config.
    """
    tensors, config = peft_state(gm)
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))

    atomic_dir(path, fill)
