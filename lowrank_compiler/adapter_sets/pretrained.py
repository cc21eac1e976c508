"""PEFT's ``save_pretrained`` / ``from_pretrained`` pair for lrc models: adapters-only directories.

The active set goes to the directory itself, every other named set to ``<dir>/<name>/`` (PEFT's layout for
several adapters); each in PEFT's files where PEFT can hold the methods, in lrc's otherwise
(``formats/pretrained.py``). ``gm.save_pretrained(dir)`` is :func:`save_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import fx, nn

from lowrank_compiler.adapter_sets.named import active_adapter, adapter_names, load_adapter, set_adapter
from lowrank_compiler.errors import LrcError
from lowrank_compiler.formats.peft import CONFIG as PEFT_CONFIG
from lowrank_compiler.formats.peft import WEIGHTS as PEFT_WEIGHTS
from lowrank_compiler.formats.pretrained import LRC_CONFIG, LRC_WEIGHTS, layout, read_pretrained, write_pretrained
from lowrank_compiler.frontend.module import PROVIDED
from lowrank_compiler.ir import lrc_meta
from lowrank_compiler.safety.atomic import atomic_dir

_FILES = {"peft": (PEFT_CONFIG, PEFT_WEIGHTS), "lrc": (LRC_CONFIG, LRC_WEIGHTS)}


def save_pretrained(gm: fx.GraphModule, save_directory: str | os.PathLike, *,
                    selected_adapters: list[str] | None = None, base_model_name_or_path: str | None = None,
                    is_main_process: bool = True, **_: Any) -> dict[str, str]:
    """Write the adapters (+ ``full`` modules) of ``gm``, never its base weights; atomic.

    Returns ``{adapter name: layout}`` ("peft" or "lrc"); other keyword arguments PEFT's method takes
    (``safe_serialization`` ...) are accepted and ignored (the files are always safetensors).

    Raises:
        LrcError: ``selected_adapters`` names an unknown set; ExportError: no adapters, or an unwritable path.
    """
    if not is_main_process:
        return {}
    active = active_adapter(gm)
    names = adapter_names(gm) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in adapter_names(gm)]
    if unknown:
        raise LrcError(f"no adapter named {unknown}; the model has {adapter_names(gm)}")
    written: dict[str, str] = {}

    def fill(tmp: Path) -> None:
        for name in names:
            where = tmp if name == active else tmp / name
            where.mkdir(exist_ok=True)
            set_adapter(gm, name)
            try:
                written[name] = write_pretrained(where, gm, base_model_name_or_path)
            finally:
                set_adapter(gm, active)

    atomic_dir(save_directory, fill)
    for name, kind in written.items():  # files of the other layout carried over from an earlier save are stale
        where = Path(save_directory) / ("" if name == active else name)
        for stale in _FILES["lrc" if kind == "peft" else "peft"]:
            (where / stale).unlink(missing_ok=True)
    return written


def from_pretrained(model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", *,
                    example_inputs: tuple[Any, ...] | None = None,
                    example_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """``model`` (a fresh, untransformed model) with the adapters of a :func:`save_pretrained` or PEFT directory:
    the directory's set becomes the active ``adapter_name``; sub-directories holding adapters become inactive
    named sets. The adapters load trainable (PEFT's ``is_trainable=True``); ``gm.eval()`` for inference.

    Raises:
        LoadError: not an adapter directory, or adapters that do not fit ``model``.
    """
    gm = read_pretrained(model, model_id, example_inputs, example_kwargs)
    lrc_meta(gm)["active_adapter"] = adapter_name
    root = Path(model_id)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            layout(sub)
        except LrcError:
            continue  # not an adapter directory (checkpoint-N, logs ...)
        load_adapter(gm, sub, sub.name)
    return gm


PROVIDED["save_pretrained"] = save_pretrained
