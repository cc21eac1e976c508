"""Loading lrc files (the format is defined in :mod:`~lowrank_compiler.formats.model`): validated before torch reads
anything, weights staged into place once, the model's face rebuilt from its recorded HF config; no pickle unless
``trust=True`` and the file is a plain torch pickle."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import LoadError
from lowrank_compiler.formats.model import (
    ADAPTER_FORMAT,
    ADAPTERS,
    FORMAT,
    INPUTS,
    KEPT_META,
    MANIFEST,
    PROGRAM,
    VERSION,
    adapter_records,
    adapter_state,
)
from lowrank_compiler.formats.rebuild import rebuild_hf_model
from lowrank_compiler.frontend.capture import register_cache_pytrees
from lowrank_compiler.frontend.module import attach
from lowrank_compiler.ir import (
    adapter_sites,
    adapters_of,
    logical_weight,
    lrc_meta,
    set_logical_weight,
)
from lowrank_compiler.methods.base import by_method_class
from lowrank_compiler.passes.full import full_parameters
from lowrank_compiler.passes.mode import make_mode_switchable
from lowrank_compiler.passes.pipelines import apply_records
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety import names as safe_names
from lowrank_compiler.safety import pt2 as safeload
from lowrank_compiler.safety import schema as validate
from lowrank_compiler.safety.staging import load_exported_program_staged
from lowrank_compiler.safety.window import FileWindow, as_file, member_window
from lowrank_compiler.spec.sites import find_sites


def _is_pickle(data: bytes | FileWindow) -> bool:
    """A raw pickle or a torch.save zip; judged without unpickling.

    A torch.save zip holds ``<root>/data.pkl`` and nothing of a torch.export archive (no
    ``archive_format``, no ``models/`` folder) and no lrc manifest: an archive that also carries a
    smuggled ``data.pkl`` is an archive, validated (and refused) as one, never routed to ``torch.load``.
    """
    if data[:1] == b"\x80":
        return True
    if data[:2] == b"PK":
        try:
            members = zipfile.ZipFile(as_file(data)).namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
            return False
        archive = MANIFEST in members or any(n.endswith("/archive_format") or "/models/" in n for n in members)
        return not archive and any(n.endswith("data.pkl") for n in members)
    return False


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise LoadError(f"{path} is a directory, not an lrc model file")
    if not path.is_file():
        raise LoadError(f"{path}: no such file" if not path.exists() else f"{path} is not a regular file")


def read_file(path: Path) -> bytes:
    _check_file(path)
    try:
        return path.read_bytes()
    except (OSError, MemoryError) as e:
        raise LoadError(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else 'out of memory'})") \
            from None


def _load_trusted_pickle(path: Path) -> nn.Module:
    try:
        obj = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001  (a trusted pickle can fail in any way)
        raise LoadError(f"{path}: the pickle could not be loaded ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    if not isinstance(obj, nn.Module):
        raise LoadError(f"{path}: the pickle holds a {type(obj).__name__}, not a model")
    return obj


@quiet
def load(path: str | os.PathLike, trust: bool = False) -> fx.GraphModule:
    """Load a file written by :func:`save`, or a ``.pt2`` torch.export archive.

    Nothing from the file is unpickled or evaluated unless ``trust=True``, which only matters for a
    legacy ``torch.save`` pickle (never for an lrc file or a torch.export archive, whatever they hold):
    archives are validated by :mod:`.safety.pt2` before torch reads them (every name by
    :mod:`.safety.names`), the manifest and tensors by :mod:`.safety.schema`, and the GraphModule built
    from the file by :func:`.safety.names.check_graph`. Every problem is a :class:`LoadError`.
    """
    path = Path(path)
    _check_file(path)
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below; tensors are copied out of it, never mapped)
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        return _load_window(path, FileWindow(f), trust)


def _load_window(path: Path, data: FileWindow, trust: bool) -> fx.GraphModule:
    src = str(path)
    _register_output_pytrees()
    if _is_pickle(data):
        if not trust:
            raise LoadError(f"{path} is a pickle (legacy torch.save), which can run arbitrary code when loaded; "
                            "load it only if you trust its source: lrc.load(..., trust=True) or `--trust`")
        return _load_trusted_pickle(path)
    if data[:2] != b"PK":
        raise LoadError(f"{path} is not an lrc model file (expected a zip written by lrc.save)")
    validate.unencrypted_zip(data, src)
    z = safeload.open_zip(data, src)
    names = set(z.namelist())
    if MANIFEST not in names:
        fmt = [n for n in names if n.count("/") == 1 and n.endswith("/archive_format")]
        if fmt and safeload.read_member(z, fmt[0], src).strip() == b"pt2":  # a .pt2, told by content not name
            return safe_names.check_graph(_from_file_program(load_exported_program_staged(data, src), [], src), src)
        raise LoadError(f"{path} is a zip but not an lrc model file (no {MANIFEST})")
    extra = sorted(names - {MANIFEST, PROGRAM, ADAPTERS, INPUTS})
    if extra:
        raise LoadError(f"{path}: unexpected member(s) {extra[:3]} in an lrc model file; lrc.save writes only "
                        f"{MANIFEST}, {PROGRAM}, {ADAPTERS} and {INPUTS}")
    manifest = validate.manifest(safeload.read_json(z, MANIFEST, src), src, FORMAT, VERSION)
    _check_manifest_names(manifest, f"{src}: {MANIFEST}")
    program = member_window(z, PROGRAM, src, crc=True)
    validate.unencrypted_zip(program, f"{src}: {PROGRAM}")
    ep = load_exported_program_staged(program, f"{src}: {PROGRAM}")
    adapters, _ = validate.safetensors_bytes(safeload.read_member(z, ADAPTERS, src), f"{src}: {ADAPTERS}")
    inputs, _ = validate.safetensors_bytes(safeload.read_member(z, INPUTS, src), f"{src}: {INPUTS}")
    names_in = manifest["input_names"]
    missing = [n for n in names_in if n not in inputs]
    if missing:
        raise LoadError(f"{src}: {INPUTS} lacks the example input(s) {missing[:5]} the manifest names")
    gm = _from_file_program(ep, manifest["sdpa_dropout"], src)
    lrc_meta(gm).update(trace="export", input_names=names_in, example_inputs=tuple(inputs[n] for n in names_in),
                        example_kwargs={}, const_kwargs=manifest["const_kwargs"], specs=manifest["specs"],
                        **{k: manifest[k] for k in KEPT_META if k in manifest})
    full = manifest.get("full_modules", [])
    if not isinstance(full, list) or not all(isinstance(x, str) and x for x in full):
        raise LoadError(f"{src}: manifest 'full_modules' must be a list of module paths")
    sites = {s.name: s.info() for s in find_sites(gm)}
    validate.adapter_budget(manifest["adapters"], sites, sum(t.numel() for t in adapters.values()), f"{src}: {MANIFEST}")
    try:
        apply_records(gm, manifest["adapters"], src, full)
    except LoadError as e:
        raise LoadError(safeload.one_line(str(e))) from None
    load_adapter_tensors(gm, adapters, src)
    merged = {r["site"]: r["merged"] for r in manifest["adapters"]}
    for site, mod in adapters_of(gm).items():
        mod.merged = merged[site]
    return with_face(safe_names.check_graph(gm, src), src)


def _check_manifest_names(manifest: dict[str, Any], source: str) -> None:
    """Every name the manifest gives that becomes a module path or a forward argument is a name path."""
    for rec in manifest.get("adapters") or []:
        if isinstance(rec, dict):
            safe_names.check_path(rec.get("site"), f"{source}: adapter site")
    for path in manifest.get("full_modules") or []:
        safe_names.check_path(path, f"{source}: full module")
    for name in manifest.get("input_names") or []:
        safe_names.check_path(name, f"{source}: input name", dotted=False)


def with_face(gm: fx.GraphModule, source: str) -> fx.GraphModule:
    """``gm`` as the object ``transform`` gives: the recorded HF model rebuilt over its tensors (every call
    signature, ``generate``, ``.config``), or without a face when the file records no HF model."""
    return attach(gm, rebuild_hf_model(lrc_meta(gm), gm, source))


def _register_output_pytrees() -> None:
    """HF output classes register their pytree node on import; a saved program's out_spec needs them."""
    try:
        import transformers.modeling_outputs  # noqa: F401
    except ImportError:
        return

    register_cache_pytrees()  # a decoder's program returns a DynamicCache


def _from_file_program(ep: torch.export.ExportedProgram, sdpa_dropout: list[float], source: str) -> fx.GraphModule:
    """:func:`from_exported_program` of a program read from a file: torch's unlifting of an inconsistent
    (validated but self-contradicting) program raises many types; each becomes a one-line LoadError."""
    try:
        with safeload.quiet_torch():
            return from_exported_program(ep, sdpa_dropout)
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{source}: the torch.export program is inconsistent ({type(e).__name__}: "
                        f"{safeload.one_line(str(e))[:160]})") from None


def from_exported_program(ep: torch.export.ExportedProgram, sdpa_dropout: list[float] | None = None) -> fx.GraphModule:
    """A plain, mode-switchable GraphModule from an ExportedProgram (no adapters)."""
    em = ep.module(check_guards=False)
    gm = fx.GraphModule(em, em.graph)
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    make_mode_switchable(gm, {n.name: p for n, p in zip(sdpa, sdpa_dropout or [])})
    gm.eval()
    lrc_meta(gm).setdefault("trace", "export")
    return gm


def _check_adapter_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} != model's {tuple(v.shape)}"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise LoadError(f"{source}: adapter tensors don't fit the model: " + "; ".join(problems[:8])
                        + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    validate.tensor_values(expected, tensors, source)


def load_adapter_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = adapter_state(gm)
    _check_adapter_tensors(expected, tensors, source)
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(v.dtype))
    for cls, mods in by_method_class(list(adapters_of(gm).values())).items():
        cls.tie(mods)  # tensors shared across sites (LoRA-drop) become one object again


def set_merged(gm: fx.GraphModule, methods: list[Any], merged: bool) -> None:
    """Merge or unmerge exactly ``methods`` (the set_merged pass does all adapters at once)."""
    ids = {id(m) for m in methods}
    for _, mark, method in adapter_sites(gm):
        if id(method) in ids and method.merged != merged:
            w = logical_weight(gm, mark)
            set_logical_weight(gm, mark, method.merged_weight(w) if merged else method.unmerged_weight(w))
            method.merged = merged


@quiet
def load_adapters(gm: fx.GraphModule, path: str | os.PathLike) -> fx.GraphModule:
    """Swap in adapters saved by :func:`save_adapters`; sites, methods, arguments and shapes must fit ``gm``.

    Adapters that are merged into the base are unmerged with their old values first and merged again
    with the new ones, so the base weights end exactly where a fresh merge would put them.
    """
    path = Path(path)
    src = str(path)
    if path.is_dir():
        raise LoadError(f"{path} is a directory, not an lrc adapter file")
    tensors, meta = validate.safetensors_bytes(read_file(path), src)
    if meta.get("format") != ADAPTER_FORMAT:
        hint = ("; a plain state dict (e.g. the HF Trainer's model.safetensors) loads with "
                "gm.load_state_dict(safetensors.torch.load_file(path))") if meta.get("format") == "pt" else ""
        raise LoadError(f"{path}: not an lrc adapter file (metadata format {meta.get('format')!r:.60}){hint}")
    records = validate.json_text(meta.get("adapters", ""), src, "the 'adapters' metadata")
    want = {(r["site"], r["method"]): r["args"] for r in validate.adapter_records(records, src)}
    have = {(r["site"], r["method"]): r["args"] for r in adapter_records(gm)}
    if set(have) != set(want):
        diff = sorted(set(want) ^ set(have))[:5]
        raise LoadError(f"{path}: adapter sites/methods differ from the model's: {diff}")
    full_have = list(lrc_meta(gm).get("full_modules", []))
    full_want = validate.json_text(meta.get("full_modules", "[]"), src, "the 'full_modules' metadata")
    if not isinstance(full_want, list) or sorted(map(str, full_want)) != sorted(full_have):
        raise LoadError(f"{path}: fully trained modules {full_want!r:.200} differ from the model's {full_have}; "
                        "transform with the spec the adapters were trained with (its `:full` rules)")
    heads = full_parameters(gm)
    heads_in = {k: v for k, v in tensors.items() if k in heads}
    expected = adapter_state(gm)
    _check_adapter_tensors(expected, {k: v for k, v in tensors.items() if k not in heads}, src)
    args_diff = [f"{k[0]}: " + ", ".join(f"{a}={want[k].get(a)!r} (model: {have[k].get(a)!r})"
                                         for a in sorted(set(want[k]) | set(have[k])) if want[k].get(a) != have[k].get(a))
                 for k in have if want[k] != have[k]]
    if args_diff:
        raise LoadError(f"{path}: adapter arguments differ from the model's: " + "; ".join(args_diff[:3]))
    validate.tensor_values(heads, heads_in, src)
    merged = [m for m in adapters_of(gm).values() if m.merged]
    with torch.no_grad():
        set_merged(gm, merged, False)
        for k, v in expected.items():
            v.copy_(tensors[k].to(v.dtype))
        for cls, mods in by_method_class(list(adapters_of(gm).values())).items():
            cls.tie(mods)
        set_merged(gm, merged, True)
    copy_checked(heads_in, heads, src)
    return gm


def copy_checked(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into the model's own (never shared) trainable copies ``params``; names and shapes must fit."""
    problems = [f"missing {k}" for k in params if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in params]
    problems += [f"{k}: shape {tuple(t.shape)} != model's {tuple(params[k].shape)}"
                 for k, t in tensors.items() if k in params and t.shape != params[k].shape]
    if problems:
        raise LoadError(f"{source}: fully trained module tensors don't fit the model: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))
