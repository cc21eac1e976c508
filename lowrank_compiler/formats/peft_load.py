"""Reading PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``): every field and tensor
checked before the model changes; ``load_peft`` rebuilds the adapters on a traced model."""


from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import fx, nn

from lowrank_compiler.errors import LoadError
from lowrank_compiler.formats.load import copy_checked, load_adapter_tensors
from lowrank_compiler.formats.model import adapter_state
from lowrank_compiler.formats.peft import CONFIG, KEY_RE, KIND_TENSORS, PREFIX, VERA_SHARED, WEIGHTS
from lowrank_compiler.frontend.trace import trace
from lowrank_compiler.ir import META_KEY, adapter_nodes, lrc_meta
from lowrank_compiler.passes.full import full_parameters
from lowrank_compiler.passes.pipelines import apply_records
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety import schema as validate
from lowrank_compiler.safety.regex import pattern_problem, suffix_match


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
    ada = config.get("peft_type") == "ADALORA"
    for key in ("alpha_pattern", "rank_pattern"):
        pat = {} if config.get(key) is None else config[key]
        if ada and key == "rank_pattern":  # AdaLoRA's: {module: kept-rank mask}; the tensors hold the kept ranks
            if not isinstance(pat, dict) or not all(isinstance(v, list) and all(isinstance(b, bool) for b in v)
                                                    for v in pat.values()):
                problems.append("rank_pattern is not an object of boolean lists (AdaLoRA's kept-rank masks)")
            continue
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


def _kind(config: dict[str, Any], p: Path) -> str:
    """Which kind of adapter a PEFT directory holds: lora, dora (LoRA with ``use_dora``), adalora or vera."""
    t = config.get("peft_type", "LORA")
    if t == "LORA":
        return "dora" if config.get("use_dora", False) is True else "lora"
    if t in ("ADALORA", "VERA"):
        return t.lower()
    raise LoadError(f"{p}: peft_type={t!r:.40} is not one lrc reads (LORA, LORA with use_dora, ADALORA, VERA)")


def _check_kind_config(kind: str, config: dict[str, Any], p: Path) -> None:
    """Types and ranges of the AdaLoRA / VeRA fields lrc turns into spec arguments (LoadError naming them)."""
    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    rules = {"adalora": {"init_r": (12, lambda v: whole(v) and v > 0, "an integer > 0"),
                         "beta1": (0.85, lambda v: num(v) and 0 < v < 1, "in (0, 1)"),
                         "beta2": (0.85, lambda v: num(v) and 0 < v < 1, "in (0, 1)"),
                         "orth_reg_weight": (0.5, lambda v: num(v) and v >= 0, "a finite number >= 0")},
             "vera": {"r": (256, lambda v: whole(v) and v > 0, "an integer > 0"),
                      "projection_prng_key": (0, lambda v: whole(v) and v >= 0, "an integer >= 0"),
                      "d_initial": (0.1, num, "a finite number"),
                      "vera_dropout": (0.0, lambda v: num(v) and 0 <= v < 1, "in [0, 1)")}}.get(kind, {})
    bad = [f"{k}={config.get(k, d)!r:.40} ({want})" for k, (d, ok, want) in rules.items() if not ok(config.get(k, d))]
    if bad:
        raise LoadError(f"{p}: bad {CONFIG}: " + "; ".join(bad[:4]))


def _check_site_tensors(kind: str, site: str, d: dict[str, torch.Tensor], config: dict[str, Any], p: Path) -> None:
    """Shapes of one site's tensors for ``kind`` (LoadError naming the site and what fits)."""
    for w, t in d.items():
        if t.dtype not in validate.FLOAT_DTYPES:
            raise LoadError(f"{p}: {site}.{w} has dtype {t.dtype}; adapter tensors must be float16, bfloat16, "
                            "float32 or float64")
        if not bool(torch.isfinite(t).all()):
            raise LoadError(f"{p}: {site}.{w} has NaN/inf entries")
    if kind == "vera":
        d_, b = d["vera_lambda_d"], d["vera_lambda_b"]
        if d_.ndim != 1 or b.ndim != 1 or d_.shape[0] != config.get("r", 256):
            raise LoadError(f"{p}: {site}: vera_lambda_d {tuple(d_.shape)} and vera_lambda_b {tuple(b.shape)} are "
                            f"not (r,) with r={config.get('r', 256)} and (d_out,)")
        return
    a, b = d["lora_A"], d["lora_B"]
    low = 0 if kind == "adalora" else 1  # AdaLoRA may keep no rank at a site
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < low:
        raise LoadError(f"{p}: {site}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not an "
                        f"(r × d_in, d_out × r) pair with the same rank r >= {low}")
    if kind == "adalora" and tuple(d["lora_E"].shape) != (a.shape[0], 1):
        raise LoadError(f"{p}: {site}: lora_E {tuple(d['lora_E'].shape)} is not ({a.shape[0]}, 1)")
    if kind == "dora" and tuple(d["lora_magnitude_vector"].shape) != (b.shape[0],):
        raise LoadError(f"{p}: {site}: lora_magnitude_vector {tuple(d['lora_magnitude_vector'].shape)} is not "
                        f"({b.shape[0]},) (one magnitude per output row)")


def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config, ``{site: {PEFT tensor name: tensor}}``) of a PEFT LoRA / DoRA / AdaLoRA / VeRA
    directory (no pickle); the names per kind are ``KIND_TENSORS[config["_kind"]]``.

    Tensors of ``modules_to_save`` are returned under ``config["_modules_to_save"]``: ``{module path: {name: t}}``;
    VeRA's saved shared projections under ``config["_shared"]``.
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
    kind = _kind(config, p)
    _check_kind_config(kind, config, p)
    problems = [f"{k}={config.get(k)!r}" for k, ok in (("bias", "none"), ("lora_bias", False)) if config.get(k, ok) != ok]
    shared = {k: tensors.pop(k) for k in VERA_SHARED if k in tensors} if kind == "vera" else {}
    sites: dict[str, dict[str, torch.Tensor]] = {}
    saved = [str(n) for n in config.get("modules_to_save") or []]
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = KEY_RE.match(key)
        module, _, leaf = key.rpartition(".")
        if not (m and m["which"] in KIND_TENSORS[kind]) and any(module == n or module.endswith("." + n) for n in saved):
            heads.setdefault(module, {})[leaf] = t
            continue
        if not m or m["which"] not in KIND_TENSORS[kind]:
            problems.append(f"unsupported tensor {key!r}")
            continue
        sites.setdefault(m["site"], {})[m["which"]] = t
    problems += [f"{s}: missing {w}" for s, d in sites.items() for w in KIND_TENSORS[kind] if w not in d]
    if problems:
        raise LoadError(f"{p}: only PEFT LoRA, DoRA, AdaLoRA and VeRA adapters on linear layers (no bias, "
                        "embeddings) with modules_to_save can be read: " + "; ".join(problems[:5]))
    for site, d in sites.items():
        _check_site_tensors(kind, site, d, config, p)
    config["_modules_to_save"], config["_kind"], config["_shared"] = heads, kind, shared
    config["_records"] = _records(config, sites, p)
    return config, sites


def _records(config: dict[str, Any], sites: dict[str, dict[str, torch.Tensor]], p: Path) -> list[dict[str, Any]]:
    """The sites as validated lrc records of the directory's kind: every reader of a PEFT directory
    (``load_peft``, ``load_adapter``, ONNX adapter export) goes through the same checks as a spec (each method's
    own argument ranges, finiteness)."""
    kind = config["_kind"]
    records = [{"site": site, "method": "lora" if kind == "lora" else kind,
                "args": _record_args(kind, config, site, d)}
               for site, d in sites.items() if kind != "adalora" or d["lora_A"].shape[0] > 0]
    return validate.adapter_records(records, f"{p}: {CONFIG}")


def peft_onnx_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """A PEFT LoRA directory as ONNX Runtime adapter tensors: ``<site>.lora_A.weight`` = Aᵀ, ``lora_B`` = (s·B)ᵀ."""
    config, sites = read_peft(path)
    if config["_kind"] != "lora":
        raise LoadError(f"{path}: ONNX Runtime adapter tensors come from PEFT LoRA directories only, this one is "
                        f"{config['_kind']}: load it with lrc.load_peft and export the model instead")
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


def _record_args(kind: str, config: dict[str, Any], site: str, d: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The lrc spec arguments that give one PEFT site of ``kind`` the same function."""
    dropout = float(config.get("vera_dropout" if kind == "vera" else "lora_dropout", 0.0))
    if kind == "vera":
        return {"r": int(config.get("r", 256)), "d_init": float(config.get("d_initial", 0.1)),
                "seed": int(config.get("projection_prng_key", 0)), "dropout": dropout}
    r = int(d["lora_A"].shape[0])
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, site, config.get("lora_alpha", 8)))
    if kind == "adalora":
        # PEFT scales by lora_alpha / (ranknum + 1e-5) with ranknum = init_r, also after ranks were pruned;
        # lrc scales by alpha / init_r with init_r = the ranks kept here (schedule inert: target_r = init_r)
        init_r = float(config.get("init_r", 12))
        return {"init_r": r, "target_r": r, "alpha": alpha * r / (init_r + 1e-5), "dropout": dropout,
                "total_step": 1, "beta1": float(config.get("beta1", 0.85)), "beta2": float(config.get("beta2", 0.85)),
                "orth_reg": float(config.get("orth_reg_weight", 0.5))}
    return {"r": r, "alpha": alpha, "dropout": dropout, "rslora": bool(config.get("use_rslora", False))}


def _check_vera_projections(gm: fx.GraphModule, shared: dict[str, torch.Tensor], source: str) -> None:
    """lrc regenerates VeRA's shared pair from ``projection_prng_key``; the saved pair must be that one."""
    if not shared:
        return
    for node in adapter_nodes(gm):
        m = gm.get_submodule(node.meta[META_KEY].module_path)
        want_a = shared.get(VERA_SHARED[0])
        want_b = shared.get(VERA_SHARED[1])
        ok = (want_a is None or (want_a.shape[0] == m.vera_A.shape[0] and want_a.shape[1] >= m.vera_A.shape[1]
                                 and torch.equal(want_a[:, :m.vera_A.shape[1]].float(), m.vera_A.float())))
        ok = ok and (want_b is None or (want_b.shape[1] == m.vera_B.shape[1] and want_b.shape[0] >= m.vera_B.shape[0]
                                        and torch.equal(want_b[:m.vera_B.shape[0]].float(), m.vera_B.float())))
        if not ok:
            raise LoadError(f"{source}: the saved VeRA projections are not the pair projection_prng_key gives for "
                            f"site {node.meta[META_KEY].site!r}; lrc regenerates them from the key and cannot hold others")


@quiet
def load_peft(model: nn.Module, path: str | os.PathLike, example_inputs: tuple[Any, ...] | None = None,
              example_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` (or take an adapter-free lrc GraphModule) and insert the PEFT adapters at ``path``.

    Without example inputs, an HF model gets ``input_ids`` [2, 16] + ``attention_mask``.

    Raises:
        LoadError: not a PEFT LoRA / DoRA / AdaLoRA / VeRA directory, names/shapes that don't fit the model.
    """

    config, sites = read_peft(path)
    gm = trace_base(model, example_inputs, example_kwargs)
    kind = config["_kind"]
    records = config.pop("_records")
    sites = {s: d for s, d in sites.items() if kind != "adalora" or d["lora_A"].shape[0] > 0}  # no rank left: no adapter
    heads = config.pop("_modules_to_save")
    apply_records(gm, records, str(path), list(heads))
    state = {k: v.detach().clone() for k, v in adapter_state(gm).items()}  # buffers PEFT does not hold keep their init
    state.update({f"{s}.adapter.{w}": t for s, d in sites.items() for w, t in d.items()})
    load_adapter_tensors(gm, state, str(path))
    if kind == "vera":
        _check_vera_projections(gm, config["_shared"], str(path))
    copy_checked({f"{m}.{k}": t for m, d in heads.items() for k, t in d.items()}, full_parameters(gm), str(path))
    lrc_meta(gm).setdefault("base_model_name_or_path", config.get("base_model_name_or_path"))
    return gm
