"""Merged export in Hugging Face ``save_pretrained`` layout: ``config.json`` + ``model.safetensors``.

The adapters are folded into the weights, the tensors are renamed to nothing (a traced HF model keeps
its module paths) and handed to the model class the config names, which writes the directory itself;
``AutoModel*.from_pretrained(path)`` then loads it with no missing or unexpected keys.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import ExportError, LoadError
from lowrank_compiler.frontend.trace import trace
from lowrank_compiler.ir import lrc_meta
from lowrank_compiler.passes.merge import merge as merge_pass
from lowrank_compiler.quiet import quiet, quiet_third_party
from lowrank_compiler.safety import schema as validate
from lowrank_compiler.safety.atomic import atomic_dir

_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"


def hf_class(names: list[Any]) -> type | None:
    """The first ``transformers`` model class among ``names`` (``BertForSequenceClassification`` ...), or None."""
    import transformers

    for name in names:
        cls = getattr(transformers, str(name), None) if name else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return None


def config_and_class(gm: fx.GraphModule, config: Any | None) -> tuple[Any, type]:
    """(transformers config, model class) of ``gm``: ``config`` or the one recorded at trace time."""
    try:
        import transformers
    except ImportError:
        raise ExportError("HF layout export needs `transformers` (pip install 'lowrank-compiler[hf]')") from None
    meta = lrc_meta(gm)
    if config is None:
        config = getattr(gm, "config", None)
    if config is None and meta.get("hf_config"):
        d = dict(meta["hf_config"])
        model_type = d.pop("model_type", None)
        if model_type is None:
            raise ExportError("the recorded HF config has no model_type; pass config= to export")
        try:
            config = transformers.AutoConfig.for_model(str(model_type), **d)
        except Exception as e:  # noqa: BLE001  (transformers raises many types for a bad config)
            raise ExportError(f"the recorded HF config does not build a transformers config "
                              f"({_first_line(e)}); pass config= to export") from None
    if config is None or not isinstance(config, transformers.PretrainedConfig):
        raise ExportError("HF layout export needs the model's transformers config: trace an HF model (its config "
                          "is recorded), load an HF directory, or pass config=")
    names = [meta.get("model_class")] + list(getattr(config, "architectures", None) or [])
    cls = hf_class(names)
    if cls is not None:
        return config, cls
    raise ExportError(f"no transformers model class among {[n for n in names if n]}; the HF layout needs one "
                      "(set config.architectures)")


def merged_state(gm: fx.GraphModule, model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged graph's tensors under ``model``'s state_dict keys (tied keys filled from their twin).

    Raises:
        ExportError: ``model`` has a tensor the graph does not (its name or shape does not fit).
    """

    merged = merge_pass(copy.deepcopy(gm)).gm
    have = {**dict(merged.named_buffers()), **dict(merged.named_parameters())}
    twins: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        twins.setdefault(id(p), []).append(name)
    out: dict[str, torch.Tensor] = {}
    missing, bad = [], []
    for key, ref in model.state_dict(keep_vars=True).items():
        src = next((n for n in [key, *twins.get(id(ref), [])] if n in have), None)
        if src is None:
            missing.append(key)
        elif have[src].shape != ref.shape:
            bad.append(f"{key}: {tuple(have[src].shape)} != {tuple(ref.shape)}")
        else:
            out[key] = have[src].detach()
    if missing or bad:
        raise ExportError(f"the graph does not hold the tensors {type(model).__name__} needs: "
                          + "; ".join([f"missing {k}" for k in missing[:5]] + bad[:5]))
    return out


@quiet
def save_hf(gm: fx.GraphModule, path: str | os.PathLike, config: Any | None = None) -> dict[str, Any]:
    """Write the merged model as an HF directory (``config.json`` + ``model.safetensors``); atomic.

    Returns ``{"path", "format", "model_class"}``.

    Raises:
        ExportError: no transformers config/class, or tensors that don't fit the class.
    """
    config, cls = config_and_class(gm, config)
    with torch.device("meta"), quiet_third_party():  # shapes checked before a (maybe huge) model is allocated
        state = merged_state(gm, cls(copy.deepcopy(config)))
    model = cls(copy.deepcopy(config))
    model.load_state_dict(state, strict=True)  # every tensor comes from the graph
    model.eval()

    atomic_dir(path, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))
    return {"path": str(path), "format": "hf", "model_class": cls.__name__}


def hf_model_class(config: Any) -> type:
    """The transformers class a config names in ``architectures`` (``BertForSequenceClassification`` ...),
    so a directory keeps its head; ``AutoModel`` when it names none."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    cls = hf_class(names)
    if cls is None and names:
        raise LoadError(f"config.architectures names {names!r:.200}, which this transformers "
                        f"{transformers.__version__} does not have")
    return cls or transformers.AutoModel


def _weight_files(p: Path) -> list[Path]:
    """The directory's safetensors weight files (one file, or the shards its index names, all inside ``p``)."""
    if (p / _WEIGHTS).is_file():
        return [p / _WEIGHTS]
    if (p / _INDEX).is_file():
        index = validate.json_text(_read_small(p / _INDEX), str(p), _INDEX)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
            raise LoadError(f"{p}: {_INDEX} has no 'weight_map' of tensor names to file names")
        files = sorted(set(wm.values()))
        bad = [f for f in files if Path(f).name != f or not f.endswith(".safetensors") or not (p / f).is_file()]
        if bad:
            raise LoadError(f"{p}: {_INDEX} names shard(s) {bad[:3]!r:.200} that are not .safetensors files "
                            "in the directory")
        return [p / f for f in files]
    pickles = sorted(f.name for f in p.glob("*.bin")) + sorted(f.name for f in p.glob("*.pt*"))
    if pickles:
        raise LoadError(f"{p}: the weights are {pickles[0]} (a pickle, which can run code; not loaded); "
                        "re-save with save_pretrained(..., safe_serialization=True)")
    raise LoadError(f"{p}: no {_WEIGHTS} (a Hugging Face directory needs its weights as safetensors)")


def _read_small(f: Path, limit: int = 16 << 20) -> bytes:
    if f.stat().st_size > limit:
        raise LoadError(f"{f}: larger than {limit >> 20} MiB; not a config file")
    return f.read_bytes()


def _held(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes the weight files declare (headers only; no tensor data is read)."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = tuple(h.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise LoadError(f"{f}: not a valid safetensors file ({str(e).strip()[:160]})") from None
    return out


def _check_held(p: Path, cls: type, config: Any, held: dict[str, tuple[int, ...]]) -> None:
    """The model the config describes, built on the meta device (nothing allocated), must not need more
    tensor elements than the files hold: a small directory cannot make lrc build a huge model."""
    try:
        with torch.device("meta"), quiet_third_party():
            build = getattr(cls, "from_config", None) if not hasattr(cls, "_from_config") else None
            model = (build or cls)(copy.deepcopy(config))
    except Exception as e:  # noqa: BLE001  (a config transformers cannot build a model from)
        raise LoadError(f"{p}: config.json does not describe a {cls.__name__} ({_first_line(e)})") from None
    need = {k: tuple(t.shape) for k, t in model.named_parameters()}
    n_need, n_held = sum(math.prod(s) for s in need.values()), sum(math.prod(s) for s in held.values())
    if n_need > n_held:
        strip = {k.split(".", 1)[1] for k in held if "." in k}
        missing = [k for k in need if k not in held and k not in strip]
        raise LoadError(f"{p}: the config describes a model with {n_need} weights but the safetensors hold "
                        f"{n_held}; missing e.g. {missing[:5]}")


def load_hf_dir(path: str | os.PathLike, seq: int = 16) -> fx.GraphModule:
    """Trace a Hugging Face model directory (``config.json`` + safetensors weights), offline, no remote code.

    Raises:
        LoadError: no config or no safetensors weights (a ``.bin`` pickle is never read), ``auto_map``
        (code from the directory), a config that describes more weights than the files hold, or any
        missing, unexpected or mis-shaped weight (nothing is initialized at random).
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise LoadError(f"{p} is a directory without config.json (expected a Hugging Face model directory)")
    raw = validate.json_text(_read_small(p / "config.json"), str(p), "config.json")
    if not isinstance(raw, dict):
        raise LoadError(f"{p}: config.json is not a JSON object")
    if "auto_map" in raw:
        raise LoadError(f"{p}: config.json has 'auto_map' (model code shipped in the directory), which lrc never "
                        "runs; load the model yourself and pass it to lrc.transform")
    files = _weight_files(p)
    try:
        import transformers
    except ImportError:
        raise LoadError("loading a Hugging Face directory needs `transformers` (pip install 'lowrank-compiler[hf]')") \
            from None
    try:
        with quiet_third_party():
            config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a bad config)
        raise LoadError(f"{p}: config.json is not a usable transformers config ({_first_line(e)})") from None
    cls = hf_model_class(config)
    _check_held(p, cls, config, _held(files))
    try:
        with quiet_third_party():
            model, info = cls.from_pretrained(str(p), local_files_only=True, use_safetensors=True,
                                              trust_remote_code=False, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{p}: could not load as a Hugging Face model offline ({_first_line(e)})") from None
    bad = [f"{what} {sorted(info.get(key) or [])[:5]!r:.300}" for key, what in
           (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mis-shaped"))
           if info.get(key)]
    if bad:
        raise LoadError(f"{p}: the weights don't fit {cls.__name__} (nothing is initialized at random): "
                        + "; ".join(bad))
    model.eval()
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    ids = torch.randint(0, vocab, (2, seq))
    kwargs: dict[str, Any] = {"attention_mask": torch.ones(2, seq, dtype=torch.long)}
    if getattr(config, "use_cache", False) or "use_cache" in config.to_dict():
        kwargs["use_cache"] = False
    with quiet_third_party():
        gm = trace(model, (ids,), kwargs)
    lrc_meta(gm)["base_model_name_or_path"] = str(p)
    return gm


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
