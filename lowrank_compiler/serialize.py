"""save/load without pickle: a zip of a torch.export archive (base graph + weights), a JSON
manifest (which adapter sits where) and safetensors (adapter tensors, example inputs)."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import fx, nn

from .errors import LoadError, SpecError
from .ir import META_KEY, AdapterMark, adapter_nodes, adapters_of, lrc_meta
from .passes.mode import TrainOnlySDPA, make_mode_switchable
from .pipelines import adapter_pipeline, base_pipeline
from .sites import find_sites
from .trace import export_program

FORMAT = "lrc-model"
ADAPTER_FORMAT = "lrc-adapters"
VERSION = 1
_MANIFEST, _PROGRAM, _ADAPTERS, _INPUTS = "manifest.json", "program.pt2", "adapters.safetensors", "inputs.safetensors"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(fileobj)`` to a temp file beside ``path``, then rename over it.

    On any failure the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tensors(d: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous().clone() for k, v in d.items()})


def adapter_records(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """One JSON-able record per adapter: site, method, args, merged flag."""
    out = []
    for node in adapter_nodes(gm):
        mark: AdapterMark = node.meta[META_KEY]
        mod = gm.get_submodule(mark.module_path)
        out.append({"site": mark.site, "method": mark.method, "args": dict(mod.config), "merged": bool(mod.merged)})
    return out


def adapter_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers), keyed by its path in ``gm``."""
    out: dict[str, torch.Tensor] = {}
    for node in adapter_nodes(gm):
        path = node.meta[META_KEY].module_path
        for k, v in gm.get_submodule(path).state_dict().items():
            out[f"{path}.{k}"] = v
    return out


def save(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``gm`` (base graph, base weights, adapters) to one file; atomic, no pickle."""
    meta = lrc_meta(gm)
    inputs = tuple(meta.get("example_inputs") or ())
    if not inputs:
        raise LoadError("cannot save: the model was traced without example inputs; pass "
                        "example_inputs=(...) to lrc.transform so the base graph can be exported")
    base = base_pipeline()(gm).gm.eval()
    sdpa_p = [m.p for _, m in sorted(((n, m) for n, m in base.named_modules() if isinstance(m, TrainOnlySDPA)),
                                    key=lambda nm: _node_order(base, nm[0]))]
    try:
        ep = export_program(base, inputs)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot save: re-exporting the base graph failed: {type(e).__name__}: {e}") from e
    prog = io.BytesIO()
    torch.export.save(ep, prog)
    names = list(meta.get("input_names") or [f"input_{i}" for i in range(len(inputs))])
    manifest = {
        "format": FORMAT, "version": VERSION, "input_names": names, "sdpa_dropout": sdpa_p,
        "const_kwargs": {k: v for k, v in (meta.get("const_kwargs") or {}).items()
                         if isinstance(v, (int, float, str, bool, type(None)))},
        "specs": list(meta.get("specs", [])), "adapters": adapter_records(gm),
    }

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(_MANIFEST, json.dumps(manifest, indent=1))
            z.writestr(_PROGRAM, prog.getvalue())
            z.writestr(_ADAPTERS, _tensors(adapter_state(gm)))
            z.writestr(_INPUTS, _tensors(dict(zip(names, inputs))))

    atomic_write(path, write)
    gm.train(gm.training)


def _node_order(gm: fx.GraphModule, module_path: str) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "call_module" and n.target == module_path:
            return i
    return -1


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist()) and _MANIFEST not in z.namelist()
    return False


def load(path: str | os.PathLike, trust: bool = False) -> fx.GraphModule:
    """Load a file written by :func:`save` (never runs pickled code unless ``trust=True``)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    _register_output_pytrees()
    if _is_pickle(path):
        if not trust:
            raise LoadError(f"{path} is a pickle (legacy torch.save), which can run arbitrary code when loaded; "
                            "load it only if you trust its source: lrc.load(..., trust=True) or `--trust`")
        obj = torch.load(path, weights_only=False)
        if not isinstance(obj, nn.Module):
            raise LoadError(f"{path}: the pickle holds a {type(obj).__name__}, not a model")
        return obj
    if not zipfile.is_zipfile(path):
        raise LoadError(f"{path} is not an lrc model file (expected a zip written by lrc.save)")
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        if _MANIFEST not in names:
            if any(n.endswith(".json") and "archive" in n or n.endswith("serialized_exported_program.json")
                   for n in names):
                return from_exported_program(torch.export.load(str(path)))
            raise LoadError(f"{path} is a zip but not an lrc model file (no {_MANIFEST})")
        manifest = json.loads(z.read(_MANIFEST))
        if manifest.get("format") != FORMAT:
            raise LoadError(f"{path}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version", 0) > VERSION:
            raise LoadError(f"{path}: written by a newer lrc (format version {manifest['version']} > {VERSION})")
        ep = torch.export.load(io.BytesIO(z.read(_PROGRAM)))
        adapters = st_load(z.read(_ADAPTERS))
        inputs = st_load(z.read(_INPUTS))
    gm = from_exported_program(ep, manifest.get("sdpa_dropout") or [])
    names_in = manifest["input_names"]
    lrc_meta(gm).update(trace="export", input_names=names_in, example_inputs=tuple(inputs[n] for n in names_in),
                        example_kwargs={}, const_kwargs=manifest.get("const_kwargs", {}),
                        specs=manifest.get("specs", []))
    apply_records(gm, manifest["adapters"], str(path))
    _load_adapter_tensors(gm, adapters, str(path))
    merged = {r["site"]: bool(r.get("merged", False)) for r in manifest["adapters"]}
    for site, mod in adapters_of(gm).items():
        mod.merged = merged[site]
    return gm


def _register_output_pytrees() -> None:
    """HF output classes register their pytree node on import; a saved program's out_spec needs them."""
    try:
        import transformers.modeling_outputs  # noqa: F401
    except ImportError:
        return
    from .trace import register_cache_pytrees

    register_cache_pytrees()  # a decoder's program returns a DynamicCache


def from_exported_program(ep: torch.export.ExportedProgram, sdpa_dropout: list[float] | None = None) -> fx.GraphModule:
    """A plain, mode-switchable GraphModule from an ExportedProgram (no adapters)."""
    em = ep.module(check_guards=False)
    gm = fx.GraphModule(em, em.graph)
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    make_mode_switchable(gm, {n.name: p for n, p in zip(sdpa, sdpa_dropout or [])})
    gm.eval()
    lrc_meta(gm).setdefault("trace", "export")
    return gm


def apply_records(gm: fx.GraphModule, records: list[dict[str, Any]], source: str = "the records") -> None:
    """Insert exactly the adapters the records name, decided like a spec (one exact-name rule per site).

    Raises:
        LoadError: a record that does not parse as a rule (method, arguments) or names no site of the model.
    """
    from .spec import Spec

    if not records:
        return
    have = {s.name for s in find_sites(gm) if not s.refused}
    missing = [r.get("site") for r in records if isinstance(r, dict) and r.get("site") not in have]
    if missing:
        raise LoadError(f"{source}: the model has no linear site(s) {missing[:5]}; sites are e.g. {sorted(have)[:5]}")
    try:
        spec = Spec.for_sites((r["site"], r["method"], r.get("args", {})) for r in records)
        adapter_pipeline(spec)(gm)
    except SpecError as e:
        raise LoadError(f"{source}: the saved adapters don't fit the model: {e.reason if e.column is None else e}") \
            from None
    except (KeyError, TypeError) as e:
        raise LoadError(f"{source}: malformed adapter record ({type(e).__name__}: {e})") from None


def _load_adapter_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = adapter_state(gm)
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} != model's {tuple(v.shape)}"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise LoadError(f"{source}: adapter tensors don't fit the model: " + "; ".join(problems[:8])
                        + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(v.dtype))


def save_adapters(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write only the adapters (tensors + which method sits where) as one safetensors file."""
    meta = {"format": ADAPTER_FORMAT, "version": str(VERSION), "adapters": json.dumps(adapter_records(gm))}
    data = st_save({k: v.detach().cpu().contiguous().clone() for k, v in adapter_state(gm).items()}, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def load_adapters(gm: fx.GraphModule, path: str | os.PathLike) -> fx.GraphModule:
    """Swap in adapters saved by :func:`save_adapters`; names, methods and shapes must fit ``gm``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{path} is not a safetensors adapter file: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise LoadError(f"{path}: not an lrc adapter file (metadata format {meta.get('format')!r})")
    have = {(r["site"], r["method"]) for r in adapter_records(gm)}
    want = {(r["site"], r["method"]) for r in json.loads(meta["adapters"])}
    if have != want:
        diff = sorted(want ^ have)[:5]
        raise LoadError(f"{path}: adapter sites/methods differ from the model's: {diff}")
    _load_adapter_tensors(gm, tensors, str(path))
    return gm
