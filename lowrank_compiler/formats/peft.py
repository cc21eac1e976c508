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
from lowrank_compiler.safety import schema as validate
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


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 100_000 and all(isinstance(x, str) and len(x) <= 1000 for x in v)


def _opt_str(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= 4096)


# every adapter_config field lrc writes or reads: (valid when, what is valid); unknown fields are ignored
_FIELDS: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "task_type": (_opt_str, "a string or null"),
    "base_model_name_or_path": (_opt_str, "a string (at most 4096 characters) or null"),
    "revision": (_opt_str, "a string or null"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "r": (lambda v: type(v) is int and 0 < v <= 1 << 20, "an integer in [1, 2^20]"),
    "lora_alpha": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: isinstance(v, str), "a string"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or an init name"),
    "target_modules": (lambda v: v is None or _opt_str(v) or _str_list(v), "a list of names, a regex or null"),
    "modules_to_save": (lambda v: v is None or _str_list(v), "a list of module names or null"),
    "layers_to_transform": (lambda v: v is None or type(v) is int
                            or (isinstance(v, list) and all(type(x) is int for x in v)), "an integer list or null"),
    "layers_pattern": (lambda v: v is None or _opt_str(v) or _str_list(v), "a string, a list of strings or null"),
}


def _check_config(config: Any, p: Path) -> None:
    """Types and ranges of every adapter_config field lrc knows; LoadError naming the field."""
    if not isinstance(config, dict):
        raise LoadError(f"{p}: {CONFIG} is not a JSON object")
    problems = [f"{k}={config[k]!r:.40} ({what})" for k, (ok, what) in _FIELDS.items()
                if k in config and not ok(config[k])]
    for key in ("alpha_pattern", "rank_pattern"):
        pat = {} if config.get(key) is None else config[key]
        if not isinstance(pat, dict):
            problems.append(f"{key} is not an object")
            continue
        for k, v in pat.items():
            why = pattern_problem(k)
            if why:
                problems.append(f"{key} key {k!r:.40}: {why}")
            elif not (_number(v) and v > 0):
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
    config = validate.json_text((p / CONFIG).read_bytes(), str(p), CONFIG)
    try:
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
            if t.dtype not in validate.FLOAT_DTYPES:
                raise LoadError(f"{p}: {site}.{w} has dtype {t.dtype}; adapter tensors must be float16, "
                                "bfloat16, float32 or float64")
            if not bool(torch.isfinite(t).all()):
                raise LoadError(f"{p}: {site}.{w} has NaN/inf entries")
    config["_modules_to_save"] = heads
    config["_records"] = _records(config, sites, p)
    return config, sites


def _records(config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]], p: Path) -> list[dict[str, Any]]:
    """The sites as validated ``lora`` records: every reader of a PEFT directory (``load_peft``, ONNX adapter
    export) goes through the same checks as a spec (``lora``'s own argument ranges, finiteness)."""
    rslora = bool(config.get("use_rslora", False))
    records = [{"site": site, "method": "lora",
                "args": {"r": int(d["lora_A"].shape[0]), "rslora": rslora,
                         "alpha": float(_pattern_value(config.get("alpha_pattern") or {}, site,
                                                       config.get("lora_alpha", 8))),
                         "dropout": float(config.get("lora_dropout", 0.0))}} for site, d in sites.items()]
    return validate.adapter_records(records, f"{p}: {CONFIG}")


def peft_onnx_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """A PEFT LoRA directory as ONNX Runtime adapter tensors: ``<site>.lora_A.weight`` = Aᵀ, ``lora_B`` = (s·B)ᵀ."""
    config, sites = read_peft(path)
    out: dict[str, Any] = {}
    for rec in config["_records"]:
        site, args = rec["site"], rec["args"]
        s = args["alpha"] / (args["r"] ** 0.5) if args["rslora"] else args["alpha"] / args["r"]
        b = sites[site]["lora_B"].float() * s
        if not bool(torch.isfinite(b).all()):
            raise LoadError(f"{path}: {site}.lora_B times its scale {s:g} overflows float32")
        out[f"{site}.lora_A.weight"] = sites[site]["lora_A"].float().t().contiguous().numpy()
        out[f"{site}.lora_B.weight"] = b.t().contiguous().numpy()
    return out


def peft_records(config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """The validated lrc adapter records (``lora`` with PEFT's rank, alpha, dropout, rslora per site) of
    :func:`read_peft`'s output (the same checks as a spec: every reader of a PEFT folder goes through them)."""
    return config["_records"] if "_records" in config else _records(config, sites, Path("adapter_config"))


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
    records = config.pop("_records")
    heads = config.pop("_modules_to_save")
    apply_records(gm, records, str(path), list(heads))
    _load_adapter_tensors(gm, peft_tensors(sites), str(path))
    _copy_checked({f"{m}.{k}": t for m, d in heads.items() for k, t in d.items()}, full_parameters(gm), str(path))
    lrc_meta(gm).setdefault("base_model_name_or_path", config.get("base_model_name_or_path"))
    return gm
