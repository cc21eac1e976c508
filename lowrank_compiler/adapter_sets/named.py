"""Named adapters on one transformed model, with PEFT's semantics.

One adapter set is *active*: its modules sit at ``<site>.adapter`` and are what the graph calls, so
merge, save, export and training see it and nothing else. The other named sets wait in
``gm.lrc_adapters.<name>.<site key>`` (frozen, like PEFT's inactive adapters); ``set_adapter`` swaps
modules in and out of ``<site>.adapter`` without touching the graph. Every set covers the same sites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import LoadError, LrcError, SpecError
from lowrank_compiler.formats.load import load_adapter_tensors, load_adapters, read_file
from lowrank_compiler.formats.model import ADAPTER_FORMAT, save_adapters
from lowrank_compiler.formats.peft_load import peft_records, peft_tensors, read_peft
from lowrank_compiler.formats.pretrained import LRC_WEIGHTS, layout, read_lrc_dir
from lowrank_compiler.ir import META_KEY, NAMED_ROOT, adapter_nodes, adapters_of, lrc_meta
from lowrank_compiler.methods.base import AdapterMethod
from lowrank_compiler.passes.full import full_parameters
from lowrank_compiler.passes.pipelines import adapter_pipeline, apply_records
from lowrank_compiler.passes.strip import strip
from lowrank_compiler.safety import schema as validate
from lowrank_compiler.safety.atomic import atomic_write
from lowrank_compiler.spec.language import Spec, parse_spec
from lowrank_compiler.spec.sites import find_sites

DEFAULT = "default"


def _key(site: str) -> str:
    return site.replace(".", "__")


def _store(gm: fx.GraphModule) -> nn.ModuleDict:
    if not hasattr(gm, NAMED_ROOT):
        gm.add_module(NAMED_ROOT, nn.ModuleDict())
    return getattr(gm, NAMED_ROOT)


def _active_modules(gm: fx.GraphModule) -> dict[str, tuple[str, AdapterMethod]]:
    """``{site: (module path, module)}`` of the adapters the graph calls."""
    out = {}
    for n in adapter_nodes(gm):
        mark = n.meta[META_KEY]
        out[mark.site] = (mark.module_path, gm.get_submodule(mark.module_path))
    if not out:
        raise LrcError("the model has no adapters; call lrc.transform(model, spec) first")
    return out


def active_adapter(gm: fx.GraphModule) -> str:
    """The name of the adapter set the graph runs (``"default"`` for the one ``transform`` inserted)."""
    return lrc_meta(gm).get("active_adapter", DEFAULT)


def adapter_names(gm: fx.GraphModule) -> list[str]:
    """Every adapter set's name, the active one first."""
    _active_modules(gm)
    return [active_adapter(gm)] + [n for n in (_store(gm).keys() if hasattr(gm, NAMED_ROOT) else [])]


def named_adapter_modules(gm: fx.GraphModule, name: str) -> dict[str, AdapterMethod]:
    """``{site: adapter module}`` of the set ``name`` (active or not), in graph order."""
    active = _active_modules(gm)
    if name == active_adapter(gm):
        return {s: m for s, (_, m) in active.items()}
    _check_name(gm, name)
    held = _store(gm)[name]
    return {s: held[_key(s)] for s in active}


def _check_name(gm: fx.GraphModule, name: str) -> None:
    names = adapter_names(gm)
    if name not in names:
        raise LrcError(f"no adapter named {name!r}; the model has {names}")


def _freeze(mod: AdapterMethod) -> None:
    """Remember which of ``mod``'s parameters train, then freeze them all (inactive adapter).

    Adapters a trainable mixed-batch graph holds (``lrc.adapter_sets.mixed_batch``) keep training there: not frozen."""
    if mod.mixed_trainable:
        return
    if mod.saved_trainable is None:
        mod.saved_trainable = {n: p.requires_grad for n, p in mod.named_parameters()}
    for p in mod.parameters():
        p.requires_grad_(False)


def _thaw(mod: AdapterMethod) -> None:
    flags = mod.saved_trainable
    if flags is not None:
        for n, p in mod.named_parameters():
            p.requires_grad_(flags.get(n, True))
        mod.saved_trainable = None


def _build(gm: fx.GraphModule, fill) -> dict[str, AdapterMethod]:
    """New adapter modules for ``gm``'s sites, made by running ``fill(view)`` on a base-only view of it
    (the insert pass on the stripped graph); ``gm`` itself is not changed."""

    view = strip(gm).gm
    view.meta[META_KEY] = {**lrc_meta(gm), "specs": list(lrc_meta(gm).get("specs", []))}
    fill(view)
    new = adapters_of(view)
    have = set(_active_modules(gm))
    if set(new) != have:
        missing, extra = sorted(have - set(new)), sorted(set(new) - have)
        raise SpecError(f"a named adapter must cover the same sites as the model's adapters; "
                        f"missing: {missing[:5]}, extra: {extra[:5]}")
    bad = [f"{s} ({m.name})" for s, m in new.items() if m.modifies_base or m.data_dependent]
    if bad:
        raise SpecError(f"named adapters share one base weight, so methods that change it or need data to "
                        f"initialize cannot be added by name: {bad[:3]}; use lora, dora, vera, ...")
    return new


def add_adapter(gm: fx.GraphModule, name: str, spec: str | Spec) -> fx.GraphModule:
    """Add an adapter set ``name`` built from ``spec`` (inactive and frozen, as PEFT's ``add_adapter``).

    Raises:
        LrcError: ``name`` is taken or not an identifier; SpecError: the spec adapts other sites.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise LrcError(f"adapter name must be an identifier, got {name!r}")
    if name in adapter_names(gm):
        raise LrcError(f"an adapter named {name!r} already exists; delete_adapter(gm, {name!r}) first")
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)

    new = _build(gm, adapter_pipeline(parsed))
    _put(gm, name, new)
    lrc_meta(gm).setdefault("named_specs", {})[name] = str(parsed)
    return gm


def _put(gm: fx.GraphModule, name: str, mods: dict[str, AdapterMethod]) -> None:
    held = nn.ModuleDict()
    for site, mod in mods.items():
        mod.train(gm.training)
        _freeze(mod)
        held[_key(site)] = mod
    _store(gm)[name] = held


def set_adapter(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """Make ``name`` the active adapter set (trainable, used by forward, merge, save and export).

    Raises:
        LrcError: no such adapter, or the active adapter is merged (``unmerge_adapters`` first).
    """
    current = active_adapter(gm)
    if name == current:
        return gm
    _check_name(gm, name)
    active = _active_modules(gm)
    merged = [s for s, (_, m) in active.items() if m.merged]
    if merged:
        raise LrcError(f"adapter {current!r} is merged at {merged[:3]}; call lrc.unmerge(gm) before "
                       "switching adapters")
    store = _store(gm)
    incoming = store[name]
    outgoing = nn.ModuleDict()
    for site, (path, mod) in active.items():
        new = incoming[_key(site)]
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
        new.bypass = mod.bypass
        new.train(gm.training)
        _thaw(new)
        _freeze(mod)
        outgoing[_key(site)] = mod
    del store[name]
    store[current] = outgoing
    lrc_meta(gm)["active_adapter"] = name
    _retag(gm)
    return gm


def _retag(gm: fx.GraphModule) -> None:
    """Each adapter node's mark, in ``gm`` and its face's traced variants (one shared hierarchy), names the method
    of the module now at its path (sets may differ in method: save, reports and exports read the mark)."""
    face = getattr(gm, "lrc_face", None)
    variants = [e.gm for es in face.variants.values() for e in es] if face is not None else []
    for g in [gm, *(v for v in variants if isinstance(v, fx.GraphModule))]:
        for n in adapter_nodes(g):
            mark = n.meta[META_KEY]
            method = g.get_submodule(mark.module_path).name
            if mark.method != method:
                n.meta[META_KEY] = dataclasses.replace(mark, method=method)


def delete_adapter(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """Remove the set ``name``; deleting the active one activates the next remaining set (as PEFT).

    Raises:
        LrcError: no such adapter, or it is the only one.
    """
    _check_name(gm, name)
    names = adapter_names(gm)
    if len(names) == 1:
        raise LrcError(f"{name!r} is the model's only adapter; lrc.merge(gm) or strip it instead of deleting it")
    if name == active_adapter(gm):
        set_adapter(gm, next(n for n in names if n != name))
    del _store(gm)[name]
    return gm


@contextlib.contextmanager
def disable_adapters(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """``with disable_adapters(gm):`` runs the base model (adapters bypassed), restored on exit."""
    mods = [m for _, m in _active_modules(gm).values()]
    merged = [m.site_name for m in mods if m.merged]
    if merged:
        raise LrcError(f"adapters are merged at {merged[:3]}; call lrc.unmerge(gm) before disabling them")
    was = [m.bypass for m in mods]
    for m in mods:
        m.bypass = True
    try:
        yield gm
    finally:
        for m, b in zip(mods, was):
            m.bypass = b


# -- saving ----------------------------------------------------------------------------------------
def save_named_adapters(gm: fx.GraphModule, directory: str | os.PathLike) -> list[Path]:
    """Write every adapter set as ``<directory>/<name>.safetensors`` (the :func:`lrc.save_adapters` format,
    loadable by it when that set is active) plus ``adapters.json`` naming the active one."""

    directory = Path(directory)
    active, out = active_adapter(gm), []
    for name in adapter_names(gm):
        set_adapter(gm, name)
        try:
            path = directory / f"{name}.safetensors"
            save_adapters(gm, path)
            out.append(path)
        finally:
            set_adapter(gm, active)
    index = json.dumps({"active": active, "adapters": [p.stem for p in out]})
    atomic_write(directory / "adapters.json", lambda f: f.write(index), mode="w")
    return out


def _read_set(path: Path) -> tuple[list[dict[str, Any]], list[str], dict[str, torch.Tensor], str]:
    """(records, ``full`` module paths, tensors, source) of an adapter file, a PEFT directory or an lrc
    ``save_pretrained`` directory."""
    if path.is_dir():
        if layout(path) == "peft":
            config, sites = read_peft(path)
            heads = config.pop("_modules_to_save")
            tensors = {**peft_tensors(sites), **{f"{m}.{k}": t for m, d in heads.items() for k, t in d.items()}}
            return peft_records(config, sites), list(heads), tensors, str(path)
        _, records, full, tensors = read_lrc_dir(path)
        return records, full, tensors, str(path / LRC_WEIGHTS)
    if not path.is_file():
        raise LoadError(f"{path}: no such file or directory (an lrc adapter file, a PEFT directory or a "
                        "save_pretrained directory)")
    tensors, meta = validate.safetensors_bytes(read_file(path), str(path))
    if meta.get("format") != ADAPTER_FORMAT:
        raise LoadError(f"{path}: not an lrc adapter file (metadata format {meta.get('format')!r:.60})")
    src = str(path)
    records = validate.adapter_records(validate.json_text(meta.get("adapters", ""), src, "the 'adapters' metadata"),
                                       src)
    full = validate.json_text(meta.get("full_modules", "[]"), src, "the 'full_modules' metadata")
    if not isinstance(full, list) or not all(isinstance(m, str) for m in full):
        raise LoadError(f"{src}: 'full_modules' metadata must be a list of module paths")
    return records, full, tensors, src


def _shared_heads(gm: fx.GraphModule, full: list[str], tensors: dict[str, torch.Tensor], source: str) -> set[str]:
    """The keys of ``full``-module tensors in a set's file; named sets share the model's heads, so they must be
    the model's own ``full`` modules holding the same values (LoadError otherwise)."""
    heads = full_parameters(gm)
    keys = {k for k in tensors if any(k.startswith(m + ".") for m in full)}
    differ = sorted(k for k in keys if k not in heads or heads[k].shape != tensors[k].shape
                    or not torch.equal(heads[k].detach().cpu(), tensors[k].to(heads[k].dtype)))
    if differ:
        raise LoadError(f"{source}: named adapter sets share the model's fully trained modules, but this set's "
                        f"{differ[:3]} differ from the model's; load it as the model's adapters instead "
                        "(lrc.adapter_sets.from_pretrained / lrc.load_adapters)")
    return keys


def load_adapter(gm: fx.GraphModule, path: str | os.PathLike, name: str) -> fx.GraphModule:
    """Add the adapters at ``path`` as the inactive set ``name`` (PEFT's ``load_adapter``): an lrc adapter file
    (``save_adapters``), a PEFT adapter directory, or a ``save_pretrained`` directory.

    Raises:
        LoadError: unreadable, or adapters that do not fit ``gm``'s sites; LrcError: ``name`` is taken.
    """
    path = Path(path)
    if not isinstance(name, str) or not name.isidentifier():
        raise LrcError(f"adapter name must be an identifier, got {name!r:.80}")
    if name in adapter_names(gm):
        raise LrcError(f"an adapter named {name!r} already exists; delete_adapter(gm, {name!r}) first")
    records, full, tensors, src = _read_set(path)
    drop = _shared_heads(gm, [str(m) for m in full], tensors, src)
    _add_set(gm, name, src, {k: v for k, v in tensors.items() if k not in drop}, records)
    return gm


def _add_set(gm: fx.GraphModule, name: str, src: str | Path, tensors: dict[str, Any],
             records: list[dict[str, Any]]) -> None:
    def fill(view: fx.GraphModule) -> None:
        sites = {s.name: s.info() for s in find_sites(view)}
        validate.adapter_budget(records, sites, sum(t.numel() for t in tensors.values()), str(src))
        apply_records(view, records, str(src))
        load_adapter_tensors(view, tensors, str(src))

    _put(gm, name, _build(gm, fill))


def _read_index(directory: Path) -> tuple[str, list[str]]:
    """``adapters.json``: ``{"active": name, "adapters": [name, ...]}``; every name is a plain file stem of a
    regular file directly inside ``directory`` (no path separators, no absolute paths, no links out)."""
    f = directory / "adapters.json"
    if not f.is_file():
        raise LoadError(f"{directory}: not a named-adapters directory (no adapters.json)")
    if f.stat().st_size > 1 << 20:
        raise LoadError(f"{f}: larger than 1 MiB; not an adapter index")
    index = validate.json_text(f.read_bytes(), str(f), "adapters.json")
    if not isinstance(index, dict) or set(index) - {"active", "adapters"}:
        raise LoadError(f"{f}: must be an object with only 'active' and 'adapters'")
    names, active = index.get("adapters"), index.get("active")
    if not isinstance(names, list) or not names or len(names) > 1000 or len(set(map(repr, names))) != len(names):
        raise LoadError(f"{f}: 'adapters' must be a non-empty list of distinct adapter names")
    root = directory.resolve()
    for n in names:
        if not (isinstance(n, str) and n.isidentifier() and len(n) <= 200):
            raise LoadError(f"{f}: adapter name {n!r:.80} is not an identifier (names are file stems in the "
                            "folder: no path separators, no absolute paths)")
        target = (directory / f"{n}.safetensors").resolve()
        if target.parent != root or not target.is_file():
            raise LoadError(f"{f}: adapter {n!r} has no regular file {n}.safetensors inside {directory}")
    if active not in names:
        raise LoadError(f"{f}: 'active' {active!r:.80} is not one of the listed adapters {names[:5]!r:.200}")
    return active, names


def load_named_adapters(gm: fx.GraphModule, directory: str | os.PathLike) -> fx.GraphModule:
    """Load every set of a :func:`save_named_adapters` directory (sets ``gm`` has take the saved tensors,
    others are added), then activate the saved active one. The index and every file are checked before
    ``gm`` is changed."""
    directory = Path(directory)
    active, names = _read_index(directory)
    sets = {n: _read_set(directory / f"{n}.safetensors") for n in names}
    for name, (records, _full, tensors, _src) in sets.items():
        if name in adapter_names(gm):  # an existing set takes the saved tensors
            set_adapter(gm, name)
            load_adapters(gm, directory / f"{name}.safetensors")
        else:
            _add_set(gm, name, directory / f"{name}.safetensors", tensors, records)
    set_adapter(gm, active)
    return gm
