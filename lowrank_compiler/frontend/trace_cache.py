"""The trace cache: each ``torch.export`` trace is paid once per machine, not once per process.

An entry is the exported *program only* (every weight and model buffer written as a one-element stub), keyed by
everything the trace depends on: the model's class, its HF config and a fingerprint of its module tree (names,
classes, plain attributes, tensor names/shapes/dtypes/devices and tying), the source files of its module classes,
the call (input names, positional count, baked constants, tensor dtypes/ranks/devices, size classes and the
dynamic-dim choices), grad mode and default dtype, and the lrc, torch, transformers and Python versions. A hit is
read back through the validated loader of lrc files (:mod:`..safety.pt2` sanitising,
:func:`..safety.staging.load_exported_program_bound`): the cache folder is writable by the user, so an entry is
untrusted input; a refused entry is reported and traced again. Its weights are bound by name to the live model's
tensors: nothing is copied.

Where: ``$LRC_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowrank_compiler``, else ``~/.cache/lowrank_compiler``, folder
``traces/``; at most ``$LRC_TRACE_CACHE_MB`` (default 1024) MB, least recently used entries evicted first.
``LRC_TRACE_CACHE=0`` (or ``lrc.transform(..., trace_cache=False)``) turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from lowrank_compiler.errors import ExportError, LoadError
from lowrank_compiler.ir import lookup_attr
from lowrank_compiler.safety import pt2
from lowrank_compiler.safety.atomic import atomic_write
from lowrank_compiler.safety.names import check_graph
from lowrank_compiler.safety.staging import load_exported_program_bound
from lowrank_compiler.safety.window import FileWindow, member_window

FORMAT = 1
KEY, PROGRAM, SUFFIX = "key.json", "program.pt2", ".lrctrace"
DEFAULT_MB = 1024
_SIMPLE = (bool, int, float, str, type(None))
_OFF = ("0", "false", "off", "no")
_G = TypeVar("_G")
_SOURCES: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256: source files hashed once


def cache_dir() -> Path:
    """``$LRC_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowrank_compiler``, else ``~/.cache/lowrank_compiler``."""
    if os.environ.get("LRC_CACHE_DIR"):
        return Path(os.environ["LRC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowrank_compiler"


def traces_dir() -> Path:
    """The folder holding the trace cache's entries (delete it to clear the cache)."""
    return cache_dir() / "traces"


def enabled(flag: bool | None = None) -> bool:
    """Whether the cache is used: ``flag`` when given, else not when ``LRC_TRACE_CACHE`` is 0/false/off/no."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("LRC_TRACE_CACHE", "1").strip().lower() not in _OFF


def _limit_bytes() -> int:
    try:
        return int(float(os.environ.get("LRC_TRACE_CACHE_MB", DEFAULT_MB)) * (1 << 20))
    except ValueError:
        return DEFAULT_MB << 20


# -- the key -----------------------------------------------------------------------------------------------
class _Uncacheable(Exception):
    """The call depends on something the key cannot state (a hook, a non-plain constant): trace, don't cache."""


def _versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"format": FORMAT, "torch": torch.__version__, "python": platform.python_version(),
                           # lrc's code that shapes an exported program: this file and capture.py (the wrapper)
                           "lrc_code": [_file_hash(Path(__file__)), _file_hash(Path(__file__).with_name("capture.py"))]}
    for pkg in ("lowrank-compiler", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _source_hash(cls: type) -> str | None:
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return _file_hash(Path(path)) if path else None


def _file_hash(path: Path) -> str | None:
    try:
        st = os.stat(path)
        k = (str(path), st.st_mtime_ns, st.st_size)
        if k not in _SOURCES:
            _SOURCES[k] = hashlib.sha256(path.read_bytes()).hexdigest()
        return _SOURCES[k]
    except OSError:
        return None


def _plain(v: Any) -> Any:
    """``v`` as JSON when it is plain data (numbers, strings, lists/dicts of them); else _Uncacheable."""
    if isinstance(v, _SIMPLE):
        return [type(v).__name__, v] if isinstance(v, float) else v
    if isinstance(v, (list, tuple)):
        return [type(v).__name__, [_plain(x) for x in v]]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _plain(x) for k, x in sorted(v.items())}
    if isinstance(v, torch.dtype):
        return str(v)
    raise _Uncacheable(f"a {type(v).__name__} value")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What the model contributes to the key: class, HF config, module tree and its classes' source files."""
    if "forward" in model.__dict__:
        raise _Uncacheable("the model's forward is replaced on the instance")
    tree, classes = [], {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if mod._forward_hooks or mod._forward_pre_hooks or getattr(mod, "_backward_hooks", None):
            raise _Uncacheable(f"module {name or type(mod).__name__!r} has hooks")
        attrs = {}
        for k, v in vars(mod).items():
            if k != "training" and not k.startswith("_") and isinstance(v, _SIMPLE + (tuple,)):
                with contextlib.suppress(_Uncacheable):
                    attrs[k] = _plain(v)
        tree.append([name, f"{type(mod).__module__}.{type(mod).__qualname__}", attrs])
        for c in type(mod).__mro__:
            if c not in (nn.Module, object):
                classes[f"{c.__module__}.{c.__qualname__}"] = _source_hash(c)
    first: dict[int, str] = {}
    tensors = []
    for kind, items in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            alias = first.setdefault(id(t), name)
            tensors.append([kind, name, list(t.shape), str(t.dtype), t.device.type, bool(t.requires_grad),
                            alias if alias != name else None])
    cfg = getattr(model, "config", None)
    config = None
    if hasattr(cfg, "to_json_string"):
        config = [json.loads(cfg.to_json_string(use_diff=False)), str(getattr(cfg, "_attn_implementation", None))]
    structure = hashlib.sha256(json.dumps([tree, tensors], sort_keys=True).encode()).hexdigest()
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "config": config,
            "structure": structure, "sources": classes}


def _size_class(n: int) -> Any:
    return n if n < 2 else "n"


def call_key(model: nn.Module, names: list[str], values: list[Any], consts: dict[str, Any], n_pos: int,
             dims: list[dict[int, Any]]) -> dict[str, Any]:
    """The full key of one trace (raises _Uncacheable when the call cannot be keyed)."""
    leaves, it = [], iter(dims)
    specs = []
    for v in values:
        flat, spec = tree_flatten(v)
        text = str(spec)
        if " at 0x" in text:
            raise _Uncacheable("an input whose structure names an object")
        specs.append(text)
        for leaf in flat:
            if isinstance(leaf, torch.Tensor):
                d = next(it) if leaf.dim() else {}
                leaves.append(["T", str(leaf.dtype), leaf.device.type, bool(leaf.requires_grad),
                               [[_size_class(s), repr(d[i]), repr(getattr(d[i], "min", None)),
                                 repr(getattr(d[i], "max", None))] if i in d else [s] for i, s in enumerate(leaf.shape)]])
            else:
                leaves.append(["V", _plain(leaf)])
    return {"versions": _versions(), "model": model_fingerprint(model),
            "call": {"names": list(names), "n_pos": n_pos, "consts": _plain(dict(consts)), "specs": specs,
                     "leaves": leaves},
            "mode": [torch.is_grad_enabled(), str(torch.get_default_dtype()), torch.is_inference_mode_enabled()]}


def fits(ep: torch.export.ExportedProgram, values: list[Any]) -> bool:
    """Whether the call's inputs satisfy the program's shapes: its fixed sizes, one size per symbol, its ranges."""
    leaves = tree_flatten(list(values))[0]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = [nodes[n].meta.get("val") if n in nodes else None for n in ep.graph_signature.user_inputs]
    if len(user) != len(leaves):
        return False
    seen: dict[Any, int] = {}
    try:
        for val, leaf in zip(user, leaves):
            if not isinstance(leaf, torch.Tensor):
                continue
            if not isinstance(val, torch.Tensor) or val.dim() != leaf.dim() or val.dtype != leaf.dtype:
                return False
            for s, n in zip(val.shape, leaf.shape):
                if isinstance(s, int):
                    if s != n:
                        return False
                    continue
                expr = s.node.expr
                if not expr.is_Symbol:
                    continue
                r = ep.range_constraints.get(expr)
                if seen.setdefault(expr, n) != n or (r is not None and bool(n < r.lower or n > r.upper)):
                    return False
    except (AttributeError, TypeError):
        return False
    return True


def entry_path(key: dict[str, Any]) -> Path:
    """The entry's file: the key's hash in :func:`traces_dir` (_Uncacheable when the key is not plain JSON)."""
    try:
        text = json.dumps(key, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _Uncacheable(f"the key is not plain JSON ({e})") from None
    digest = hashlib.sha256(text.encode()).hexdigest()[:40]
    return traces_dir() / f"{digest}{SUFFIX}"


# -- reading and writing entries -----------------------------------------------------------------------------
def read_entry(path: Path, key: dict[str, Any], root: nn.Module) -> torch.export.ExportedProgram:
    """The program stored at ``path`` for ``key``, its tensors bound to ``root``'s; LoadError when refused."""
    src = f"trace cache entry {path}"
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below; the program is copied out of it)
    except OSError as e:
        raise LoadError(f"{src}: cannot read ({e.strerror})") from None
    with f:
        data = FileWindow(f)
        z = pt2.open_zip(data, src)
        if sorted(z.namelist()) != sorted([KEY, PROGRAM]):
            raise LoadError(f"{src}: expected exactly the members {KEY} and {PROGRAM}")
        stored = pt2.read_json(z, KEY, src)
        if stored != json.loads(json.dumps(key, sort_keys=True)):
            raise LoadError(f"{src}: its key is not this trace's")
        program = member_window(z, PROGRAM, src, crc=True)

        def bind(fqn: str) -> torch.Tensor | None:
            obj = lookup_attr(root, fqn)
            return obj if isinstance(obj, torch.Tensor) else None

        return load_exported_program_bound(program, src, bind)


def write_entry(path: Path, key: dict[str, Any], ep: torch.export.ExportedProgram, root: nn.Module) -> None:
    """Store ``ep`` at ``path`` (atomically) with its weights and model buffers as one-element stubs."""
    state, consts = ep._state_dict, ep._constants
    ep._state_dict = {k: _stub(v) for k, v in state.items()}
    ep._constants = {k: _stub(v) if isinstance(lookup_attr(root, k), torch.Tensor) else v for k, v in consts.items()}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no complete tensor found": the stubs are meant to be incomplete
            torch.export.save(ep, buf)
    finally:
        ep._state_dict, ep._constants = state, consts

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(KEY, json.dumps(key, sort_keys=True))
            z.writestr(PROGRAM, buf.getvalue())

    atomic_write(path, write)


def _stub(t: Any) -> Any:
    """A tensor of ``t``'s shape and dtype over one element (zero strides): what the program needs of it."""
    if not isinstance(t, torch.Tensor):
        return t
    s = torch.zeros((), dtype=t.dtype).expand(t.shape)
    return nn.Parameter(s, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else s


def evict(keep: Path | None = None) -> None:
    """Delete least recently used entries until the folder is within ``$LRC_TRACE_CACHE_MB``."""
    entries = []
    for p in traces_dir().glob(f"*{SUFFIX}"):
        with contextlib.suppress(OSError):
            st = p.lstat()
            entries.append((st.st_mtime, st.st_size, p))
    total, limit = sum(e[1] for e in entries), _limit_bytes()
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if p != keep:
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size


# -- the one entry point -----------------------------------------------------------------------------------
def exported(root: nn.Module, label: str, key_of: Callable[[], dict[str, Any]],
             export: Callable[[], torch.export.ExportedProgram],
             fits: Callable[[torch.export.ExportedProgram], bool], build: Callable[[torch.export.ExportedProgram], _G],
             use: bool | None = None) -> _G:
    """``build(export())``, or ``build`` of the cached program for ``key_of()`` when one is stored and ``fits``
    the call (a graph built from an entry passes :func:`..safety.names.check_graph`, like one from a file).

    ``root`` holds the tensors the program names (``m.<model path>``). A miss prints one progress line
    (``lrc: tracing <label> … 12.3 s; cached for next time``); a hit prints nothing. An entry that is refused,
    or whose program does not build, is reported on one line and traced again (then replaced).
    """
    key = path = None
    why = "trace cache off"
    if enabled(use):
        try:
            key = key_of()
            path = entry_path(key)
        except _Uncacheable as e:
            key, why = None, f"not cached: {e}"
    if path is not None and path.is_file():
        try:
            ep = read_entry(path, key, root)
            if fits(ep):
                out = build(ep)
                if isinstance(out, fx.GraphModule):
                    check_graph(out, f"trace cache entry {path}")
                with contextlib.suppress(OSError):
                    os.utime(path)  # least recently used goes first
                return out
        except Exception as e:  # noqa: BLE001 - an untrusted entry may fail in any way: trace instead
            why_not = pt2.one_line(str(e)) if isinstance(e, LoadError) else \
                f"trace cache entry {path}: {type(e).__name__}: {pt2.one_line(str(e))}"
            print(f"lrc: refused {why_not[:300]}; tracing again", file=sys.stderr)
    print(f"lrc: tracing {label} … ", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        ep = export()
    except BaseException:
        print("failed", file=sys.stderr)
        raise
    took = time.perf_counter() - t0
    if path is not None:
        try:
            write_entry(path, key, ep, root)
            evict(keep=path)
            why = "cached for next time"
        except (ExportError, OSError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            why = f"not cached ({type(e).__name__}: {pt2.one_line(str(e))[:160]})"
    print(f"{took:.1f} s; {why}", file=sys.stderr)
    return build(ep)
