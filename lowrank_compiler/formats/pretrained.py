"""Adapters-only checkpoint directories: what PEFT's ``save_pretrained`` / ``from_pretrained`` pair writes and reads.

Only what training changed is written (megabytes where the base model is gigabytes): the active adapters,
the modules a ``full`` rule trains, and the base weights a method moved in a way it cannot recompute. Two layouts:

- **PEFT** (``adapter_config.json`` + ``adapter_model.safetensors``) when every adapter is plain LoRA that PEFT
  reloads as the same adapter (one dropout and one ``rslora`` for all sites): ``peft.PeftModel.from_pretrained``
  reads it, and so does :func:`read_pretrained` (as lrc LoRA).
- **lrc** (``lrc_adapter_config.json`` + ``lrc_adapter_model.safetensors``, the :func:`save_adapters` format)
  for every other method. A known low-rank base offset (LoRA-GA: W = W0 − s·B0 A0) is recomputed from the
  adapter's own buffers with the formula its init used (bit-exact); a base changed in an unknown way
  (Delta-LoRA, LoRASC) is stored under ``lrc_base.<weight path>`` (one matrix per such site).

Nothing from the directory is executed: JSON, safetensors, and the same validated insert pass as ``lrc.load``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import ExportError, LoadError
from lowrank_compiler.formats.load import copy_checked, load_adapter_tensors, read_file, set_merged
from lowrank_compiler.formats.model import ADAPTER_FORMAT, VERSION, adapter_records, write_adapter_file
from lowrank_compiler.formats.peft import CONFIG as PEFT_CONFIG
from lowrank_compiler.formats.peft import WEIGHTS as PEFT_WEIGHTS
from lowrank_compiler.formats.peft import peft_state
from lowrank_compiler.formats.peft_load import load_peft, trace_base
from lowrank_compiler.ir import adapter_sites, logical_weight, lrc_meta, set_logical_weight
from lowrank_compiler.passes.full import full_parameters
from lowrank_compiler.passes.pipelines import apply_records
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety import schema as validate

LRC_CONFIG, LRC_WEIGHTS = "lrc_adapter_config.json", "lrc_adapter_model.safetensors"
FORMAT = "lrc-pretrained"
BASE = "lrc_base."


def peft_can_hold(gm: fx.GraphModule) -> bool:
    """True when PEFT's LoRA reloads ``gm``'s adapters as the same adapters (plain ``lora``, one dropout and
    one ``rslora`` for every site)."""
    records = adapter_records(gm)
    return bool(records) and all(r["method"] == "lora" for r in records) and \
        len({(float(r["args"].get("dropout", 0.0)), bool(r["args"].get("rslora", False))) for r in records}) == 1


def changed_bases(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """``{lrc_base.<weight path>: unmerged logical weight}`` of the sites whose method moved the base weight in a
    way the adapter's own tensors cannot recompute (Delta-LoRA, LoRASC)."""
    out = {}
    for _, mark, mod in adapter_sites(gm):
        if mod.modifies_base and mod.base_offset() is None:
            w = logical_weight(gm, mark).detach()
            out[BASE + mark.weight_path] = mod.unmerged_weight(w) if mod.merged else w
    return out


def write_pretrained(directory: Path, gm: fx.GraphModule, base_model_name_or_path: str | None = None) -> str:
    """Write ``gm``'s active adapters (+ ``full`` modules, + changed bases) into the existing ``directory``;
    returns the layout written, ``"peft"`` or ``"lrc"``."""
    meta = lrc_meta(gm)
    name = base_model_name_or_path or meta.get("base_model_name_or_path")
    if peft_can_hold(gm):
        from safetensors.torch import save_file

        tensors, config = peft_state(gm)
        config["base_model_name_or_path"] = name
        save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
        (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        return "peft"
    if not adapter_records(gm):
        raise ExportError("the model has no adapters to save; call lrc.transform(model, spec) first")
    config = {"format": FORMAT, "version": VERSION, "base_model_name_or_path": name,
              "model_class": meta.get("model_class"), "specs": list(meta.get("specs", [])),
              "methods": sorted({r["method"] for r in adapter_records(gm)})}
    write_adapter_file(gm, directory / LRC_WEIGHTS, changed_bases(gm))
    (directory / LRC_CONFIG).write_text(json.dumps(config, indent=2))
    return "lrc"


def layout(path: str | os.PathLike) -> str:
    """``"lrc"`` or ``"peft"``: which adapters-only layout the directory ``path`` holds.

    Raises:
        LoadError: ``path`` is not a directory holding either.
    """
    p = Path(path)
    if not p.is_dir():
        raise LoadError(f"{p}: no such directory" if not p.exists() else
                        f"{p} is a file, not an adapter directory (lrc.load_adapters reads adapter files)")
    if (p / LRC_CONFIG).is_file():
        return "lrc"
    if (p / PEFT_CONFIG).is_file():
        return "peft"
    raise LoadError(f"{p}: not an adapter directory (neither {LRC_CONFIG} nor {PEFT_CONFIG}); "
                    "write one with gm.save_pretrained(dir)")


def read_lrc_dir(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]], list[str],
                                                   dict[str, torch.Tensor]]:
    """(config, validated adapter records, ``full`` module paths, tensors) of an lrc-layout directory."""
    p = Path(path)
    src = str(p / LRC_WEIGHTS)
    try:
        config = json.loads((p / LRC_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoadError(f"{p / LRC_CONFIG}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise LoadError(f"{p / LRC_CONFIG}: not an lrc adapter config (format must be {FORMAT!r})")
    tensors, meta = validate.safetensors_bytes(read_file(p / LRC_WEIGHTS), src)
    if meta.get("format") != ADAPTER_FORMAT:
        raise LoadError(f"{src}: not an lrc adapter file (metadata format {meta.get('format')!r:.60})")
    try:
        records = validate.adapter_records(json.loads(meta.get("adapters", "")), src)
        full = json.loads(meta.get("full_modules", "[]"))
    except ValueError as e:
        raise LoadError(f"{src}: the adapter metadata is not valid JSON ({e})") from None
    if not isinstance(full, list) or not all(isinstance(x, str) and x for x in full):
        raise LoadError(f"{src}: metadata 'full_modules' must be a list of module paths")
    return config, records, full, tensors


def put_tensors(gm: fx.GraphModule, records: list[dict[str, Any]], tensors: dict[str, torch.Tensor],
                source: str) -> None:
    """Load adapter, ``full`` and base tensors into ``gm`` (whose adapters ``records`` inserted), then restore
    moved bases and merged flags."""
    heads = full_parameters(gm)
    bases = {k: v for k, v in tensors.items() if k.startswith(BASE)}
    load_adapter_tensors(gm, {k: v for k, v in tensors.items() if k not in heads and k not in bases}, source)
    copy_checked({k: v for k, v in tensors.items() if k in heads}, heads, source)
    used = set()
    with torch.no_grad():
        for _, mark, mod in adapter_sites(gm):
            if not mod.modifies_base:
                continue
            w = logical_weight(gm, mark)
            off = mod.base_offset()
            if off is not None:  # the formula of the method's init (LoRA-GA), so the base is bit-exact
                new = w.detach().float() - off.scale * (off.B.float() @ off.A.float()).to(w.device)
            else:
                key = BASE + mark.weight_path
                if key not in bases or bases[key].shape != w.shape:
                    raise LoadError(f"{source}: the {mark.method!r} adapter of {mark.site!r} changed its base weight, "
                                    f"but the file has no {key} of shape {tuple(w.shape)}")
                new, _ = bases[key], used.add(key)
            set_logical_weight(gm, mark, new.to(w.dtype))
    extra = sorted(set(bases) - used)
    if extra:
        raise LoadError(f"{source}: unexpected base tensors {extra[:5]}")
    merged = {r["site"] for r in records if r.get("merged")}
    set_merged(gm, [m for _, mark, m in adapter_sites(gm) if mark.site in merged], True)


@quiet
def read_pretrained(model: nn.Module, path: str | os.PathLike, example_inputs: tuple[Any, ...] | None = None,
                    example_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` and put the adapters of the directory ``path`` (either layout) on it.

    Raises:
        LoadError: not an adapter directory, or adapters that do not fit ``model``.
    """
    if layout(path) == "peft":
        return load_peft(model, path, example_inputs, example_kwargs)
    config, records, full, tensors = read_lrc_dir(path)
    gm = trace_base(model, example_inputs, example_kwargs)
    src = str(Path(path) / LRC_WEIGHTS)
    apply_records(gm, records, src, full)
    put_tensors(gm, records, tensors, src)
    meta = lrc_meta(gm)
    if isinstance(config.get("specs"), list):
        meta["specs"] = [str(s) for s in config["specs"]]
    meta.setdefault("base_model_name_or_path", config.get("base_model_name_or_path"))
    return gm
