"""PEFT-format LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn

from lowrank_compiler.errors import ExportError, LoadError
from lowrank_compiler.formats.model import _copy_checked, _load_adapter_tensors, apply_records
from lowrank_compiler.frontend.trace import trace
from lowrank_compiler.ir import META_KEY, adapter_nodes, lrc_meta
from lowrank_compiler.passes.full import full_parameters
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety.atomic import atomic_dir
from lowrank_compiler.safety.regex import pattern_problem, suffix_match

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_KEY_RE = re.compile(r"^(?P<site>.+)\.(?P<which>lora_A|lora_B)(?:\.default)?\.weight$")


def peft_state(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors with PEFT key names, adapter_config dict) for the LoRA-family adapters of ``gm``.

    Per-site ranks/scales go to PEFT's ``rank_pattern``/``alpha_pattern`` (keys are full module paths).
    Modules a ``full`` rule trains go to ``modules_to_save`` (their tensors as ``base_model.model.<path>.<name>``,
    which PEFT loads into its trainable copy).

    Raises:
        ExportError: a method PEFT's plain LoRA cannot express (DoRA, or a method that changed the base
        weight in a way that is not a known low-rank offset (Delta-LoRA, LoRASC)). LoRA-GA is written as
        its rank-2r pair against the original base (``original_base_factors``).
    """
    sites: list[tuple[str, torch.Tensor, torch.Tensor, float, dict[str, Any], str]] = []
    bad = []
    for node in adapter_nodes(gm):
        mark = node.meta[META_KEY]
        m = gm.get_submodule(mark.module_path)
        f = m.original_base_factors()
        if f is None:
            bad.append((mark.site, mark.method))
            continue
        a, b, s = f
        sites.append((mark.site, a.detach(), b.detach(), float(s), dict(m.config), mark.layout))
    if bad:
        raise ExportError(f"PEFT format holds plain LoRA only (base weights unchanged, y = Wx + s·B·A·x); "
                          f"sites {bad[:4]} use other methods; export merged or in lrc format instead")
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
        "init_lora_weights": True, "use_dora": False, "lora_bias": False, "layers_to_transform": None,
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


def _pattern_value(patterns: dict[str, Any], site: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's get_pattern_key: regex over a dot-aligned suffix
        if suffix_match(key, site):
            return value
    return default


def _check_config(config: Any, p: Path) -> None:
    """Types and ranges of the adapter_config fields lrc uses; LoadError naming the field."""
    if not isinstance(config, dict):
        raise LoadError(f"{p}: {CONFIG} is not a JSON object")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    problems = []
    if not (number(config.get("lora_alpha", 8)) and config.get("lora_alpha", 8) > 0):
        problems.append(f"lora_alpha={config.get('lora_alpha')!r:.40} (a finite number > 0)")
    if not (number(config.get("lora_dropout", 0.0)) and 0 <= config.get("lora_dropout", 0.0) < 1):
        problems.append(f"lora_dropout={config.get('lora_dropout')!r:.40} (in [0, 1))")
    if not isinstance(config.get("use_rslora", False), bool):
        problems.append(f"use_rslora={config.get('use_rslora')!r:.40} (true or false)")
    for key in ("alpha_pattern", "rank_pattern"):
        pat = {} if config.get(key) is None else config[key]
        if not isinstance(pat, dict):
            problems.append(f"{key} is not an object")
            continue
        for k, v in pat.items():
            why = pattern_problem(k)
            if why:
                problems.append(f"{key} key {k!r:.40}: {why}")
            elif not (number(v) and v > 0):
                problems.append(f"{key}[{k!r:.40}]={v!r:.40} (a finite number > 0)")
    if problems:
        raise LoadError(f"{p}: bad {CONFIG}: " + "; ".join(problems[:4]))


def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config, ``{site: {"lora_A": A, "lora_B": B}}``) of a PEFT LoRA directory (no pickle).

    Tensors of ``modules_to_save`` are returned under ``config["_modules_to_save"]``: ``{module path: {name: t}}``.
    """
    p = Path(path)
    if not (p / CONFIG).is_file():
        raise LoadError(f"{p}: not a PEFT adapter directory (no {CONFIG})")
    if not (p / WEIGHTS).is_file():
        extra = " (adapter_model.bin is a pickle and is not loaded; re-save with safe_serialization=True)" \
            if (p / "adapter_model.bin").exists() else ""
        raise LoadError(f"{p}: no {WEIGHTS}{extra}")
    try:
        config = json.loads((p / CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(p / WEIGHTS))
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{p}: unreadable PEFT adapter: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    _check_config(config, p)
    problems = [f"{k}={config.get(k)!r}" for k, ok in (("peft_type", "LORA"), ("use_dora", False), ("bias", "none"),
                                                     ("lora_bias", False)) if config.get(k, ok) != ok]
    sites: dict[str, dict[str, torch.Tensor]] = {}
    saved = [str(n) for n in config.get("modules_to_save") or []]
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY_RE.match(key)
        module, _, leaf = key.rpartition(".")
        if not m and any(module == n or module.endswith("." + n) for n in saved):
            heads.setdefault(module, {})[leaf] = t
            continue
        if not m:
            problems.append(f"unsupported tensor {key!r}")
            continue
        sites.setdefault(m["site"], {})[m["which"]] = t
    problems += [f"{s}: missing {w}" for s, d in sites.items() for w in ("lora_A", "lora_B") if w not in d]
    if problems:
        raise LoadError(f"{p}: only plain PEFT LoRA (no DoRA, bias, embeddings) with modules_to_save can be read: "
                        + "; ".join(problems[:5]))
    for site, d in sites.items():
        a, b = d["lora_A"], d["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise LoadError(f"{p}: {site}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not an "
                            "(r × d_in, d_out × r) pair with the same rank r >= 1")
        for w, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise LoadError(f"{p}: {site}.{w} has dtype {t.dtype}; adapter tensors must be floating point")
            if not bool(torch.isfinite(t).all()):
                raise LoadError(f"{p}: {site}.{w} has NaN/inf entries")
    config["_modules_to_save"] = heads
    return config, sites


def peft_onnx_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """A PEFT LoRA directory as ONNX Runtime adapter tensors: ``<site>.lora_A.weight`` = Aᵀ, ``lora_B`` = (s·B)ᵀ."""
    config, sites = read_peft(path)
    out: dict[str, Any] = {}
    for site, d in sites.items():
        r = int(d["lora_A"].shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, site, config.get("lora_alpha", 8)))
        s = alpha / (r ** 0.5) if config.get("use_rslora", False) else alpha / r
        out[f"{site}.lora_A.weight"] = d["lora_A"].float().t().contiguous().numpy()
        out[f"{site}.lora_B.weight"] = (d["lora_B"].float() * s).t().contiguous().numpy()
    return out


def peft_records(config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """lrc adapter records (``lora`` with PEFT's rank, alpha, dropout, rslora per site) of :func:`read_peft`'s output."""
    rslora = bool(config.get("use_rslora", False))
    records = []
    for site, d in sites.items():
        r = int(d["lora_A"].shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, site, config.get("lora_alpha", 8)))
        records.append({"site": site, "method": "lora",
                        "args": {"r": r, "alpha": alpha, "dropout": float(config.get("lora_dropout", 0.0)),
                                 "rslora": rslora}})
    return records


def peft_tensors(sites: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """:func:`read_peft`'s pairs under the adapter state keys of an lrc graph (``<site>.adapter.lora_A``)."""
    return {f"{s}.adapter.{w}": t for s, d in sites.items() for w, t in d.items()}


def trace_base(model: nn.Module, example_inputs: tuple[Any, ...] | None = None,
               example_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """``model`` traced for adapters to be loaded onto it (an HF model without example inputs gets ``input_ids``
    [2, 16] + ``attention_mask``; an adapter-free lrc graph is copied).

    Raises:
        LoadError: ``model`` already has adapters.
    """
    if isinstance(model, fx.GraphModule) and adapter_nodes(model):
        raise LoadError("the model already has adapters; load saved adapters onto the base model")
    if example_inputs is None and example_kwargs is None and hasattr(model, "config"):
        vocab = int(getattr(model.config, "vocab_size", 100) or 100)
        g = torch.Generator().manual_seed(0)
        example_inputs = (torch.randint(0, vocab, (2, 16), generator=g),)
        example_kwargs = {"attention_mask": torch.ones(2, 16, dtype=torch.long)}
    if isinstance(model, fx.GraphModule):
        model = copy.deepcopy(model)
    return trace(model, example_inputs, example_kwargs)


@quiet
def load_peft(model: nn.Module, path: str | os.PathLike, example_inputs: tuple[Any, ...] | None = None,
              example_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` (or take an adapter-free lrc GraphModule) and insert the PEFT adapters at ``path``.

    Without example inputs, an HF model gets ``input_ids`` [2, 16] + ``attention_mask``.

    Raises:
        LoadError: not a plain-LoRA PEFT directory, names/shapes that don't fit the model.
    """

    config, sites = read_peft(path)
    gm = trace_base(model, example_inputs, example_kwargs)
    records = peft_records(config, sites)
    heads = config.pop("_modules_to_save")
    apply_records(gm, records, str(path), list(heads))
    _load_adapter_tensors(gm, peft_tensors(sites), str(path))
    _copy_checked({f"{m}.{k}": t for m, d in heads.items() for k, t in d.items()}, full_parameters(gm), str(path))
    lrc_meta(gm).setdefault("base_model_name_or_path", config.get("base_model_name_or_path"))
    return gm
