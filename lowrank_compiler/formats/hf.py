"""Merged export in Hugging Face ``save_pretrained`` layout: ``config.json`` + ``model.safetensors``.

The adapters are folded into the weights, the tensors are renamed to nothing (a traced HF model keeps
its module paths) and handed to the model class the config names, which writes the directory itself;
``AutoModel*.from_pretrained(path)`` then loads it with no missing or unexpected keys.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import lrc_meta
from lowrank_compiler.passes.merge import merge as merge_pass
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety.atomic import atomic_dir


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
        config = transformers.AutoConfig.for_model(model_type, **d)
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
    model = cls(copy.deepcopy(config))
    model.load_state_dict(merged_state(gm, model), strict=True)  # every tensor comes from the graph
    model.eval()

    atomic_dir(path, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))
    return {"path": str(path), "format": "hf", "model_class": cls.__name__}
