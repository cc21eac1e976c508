"""Load a validated torch.export archive without staging its weights in memory.

:func:`.pt2.sanitize_pt2` validates everything and rebuilds the archive with the weights declared on the
meta device; ``torch.export.load`` then reads only the program. Each weight payload is copied once, straight
from the file into its tensor (CRC-checked), and the program's meta tensors are swapped for them, keeping
aliasing (views of one payload stay views of one tensor). Peak memory: the weights, once.

:func:`load_exported_program_bound` reads an archive that holds the program only (the trace cache's entries): its
weights are never read; each is bound, by name, to a live tensor of the same shape and dtype.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lowrank_compiler.errors import LoadError
from lowrank_compiler.safety import pt2
from lowrank_compiler.safety.window import FileWindow


def load_exported_program_staged(data: FileWindow, source: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of the archive ``data`` (a window on a file), weights read once into place."""
    staged: dict[str, FileWindow] = {}
    ep = _torch_load(pt2.sanitize_pt2(data, source, staged), source)
    flat = {}
    for path, win in staged.items():
        buf = torch.empty(len(win), dtype=torch.uint8)
        win.read_into(buf, win.crc, f"{source}: {path}")  # type: ignore[attr-defined]
        flat[path] = buf
    _fill(ep, _weight_paths(data, source), flat)
    return ep


def _weight_paths(data: FileWindow, source: str) -> dict[str, str]:
    z = pt2.open_zip(data, source)
    cfg = [n for n in z.namelist() if n.endswith("_weights_config.json") and "/data/weights/" in n]
    return {fqn: e["path_name"] for fqn, e in pt2.read_json(z, cfg[0], source)["config"].items()}


def _fill(ep: torch.export.ExportedProgram, paths: dict[str, str], flat: dict[str, torch.Tensor]) -> None:
    """Replace each meta tensor of ``ep.state_dict`` by the same view of its payload's bytes."""
    state = ep.state_dict
    for fqn, meta in list(state.items()):
        buf = flat[paths[fqn]]
        elt = meta.element_size()
        if buf.numel() % elt:
            raise LoadError(f"weight {fqn!r}: its payload is not a whole number of {meta.dtype} elements")
        t = buf.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())
        state[fqn] = torch.nn.Parameter(t, requires_grad=meta.requires_grad) if isinstance(
            meta, torch.nn.Parameter) else t


def load_exported_program_bound(data: FileWindow, source: str,
                                bind: Callable[[str], torch.Tensor | None]) -> torch.export.ExportedProgram:
    """``torch.export.load`` of the validated archive ``data`` with no weight payload read: every weight (and every
    constant ``bind`` knows) becomes ``bind(fqn)``, the live tensor of that name; LoadError when one is missing or
    its shape or dtype differs from the program's."""
    ep = _torch_load(pt2.sanitize_pt2(data, source, {}), source)
    for table, required in ((ep.state_dict, True), (ep.constants, False)):
        for fqn, stored in list(table.items()):
            if not isinstance(stored, torch.Tensor):
                continue
            live = bind(fqn)
            if live is None and not required:
                continue  # a constant the export made (not one of the model's tensors): kept as stored
            if not isinstance(live, torch.Tensor) or live.shape != stored.shape or live.dtype != stored.dtype:
                have = "nothing" if not isinstance(live, torch.Tensor) else f"{tuple(live.shape)} {live.dtype}"
                raise LoadError(f"{source}: the program's tensor {fqn!r} ({tuple(stored.shape)} {stored.dtype}) "
                                f"does not fit the model's ({have})")
            table[fqn] = live
    return ep


def _torch_load(clean: bytes, source: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a sanitised archive; every failure is a LoadError."""
    try:
        with pt2.quiet_torch(), _parse_once():
            return torch.export.load(io.BytesIO(clean))
    except Exception as e:  # noqa: BLE001  (torch raises many types on inconsistent programs)
        raise LoadError(f"{source}: the torch.export program could not be loaded "
                        f"({type(e).__name__}: {pt2._short(e)})") from None


@contextmanager
def _parse_once() -> Iterator[None]:
    """Let torch's deserializer do each repeated piece of work once per load (most of a program's load time):

    - parse each (already validated) shape expression once: torch re-parses the same few strings with sympy for
      every node; a parse is reused only while every symbol in it is still the one the deserializer's table
      holds, so the result is what a fresh parse would give;
    - resolve each schema dataclass's type hints once (``typing.get_type_hints`` per JSON object otherwise);
    - process each (string, hint) once per deserializer (symbol table, hints, ranges: the first time did it all).

    Both are swapped in for the deserializer module only, for the duration of the load.
    """
    try:
        from torch._export.serde import serialize
    except ImportError:
        yield
        return
    real_sympy, real_typing = getattr(serialize, "sympy", None), getattr(serialize, "typing", None)
    if not callable(getattr(real_sympy, "sympify", None)) or not callable(getattr(real_typing, "get_type_hints", None)):
        yield
        return
    parsed: dict[str, Any] = {}
    hints: dict[tuple[Any, int, int, bool], Any] = {}

    def sympify(a: Any, *args: Any, locals: dict[str, Any] | None = None, **kw: Any) -> Any:  # noqa: A002
        if args or kw or not isinstance(a, str) or locals is None:
            return real_sympy.sympify(a, *args, locals=locals, **kw)
        hit = parsed.get(a)
        if hit is not None and all(locals.get(s.name) is s for s in hit.free_symbols):
            return hit
        parsed[a] = out = real_sympy.sympify(a, locals=locals)
        return out

    def get_type_hints(obj: Any, globalns: Any = None, localns: Any = None, include_extras: bool = False) -> Any:
        k = (obj, id(globalns), id(localns), include_extras)
        if k not in hints:
            hints[k] = real_typing.get_type_hints(obj, globalns, localns, include_extras)
        return hints[k]

    cls = getattr(serialize, "GraphModuleDeserializer", None)
    real_parse = getattr(cls, "_parse_sym_expr", None)
    done: dict[tuple[int, str, Any], Any] = {}

    def parse_sym_expr(self: Any, expr_str: str, hint: Any = None) -> Any:
        # the same string (and hint) gives the same expression; its side effects (symbol table, hints, ranges)
        # were all made by the first parse of this deserializer
        k = (id(self), expr_str, hint)
        if k not in done:
            done[k] = real_parse(self, expr_str, hint)
        return done[k]

    fast_sympy, fast_typing = type(real_sympy)("sympy"), type(real_typing)("typing")
    fast_sympy.__dict__.update(real_sympy.__dict__)
    fast_typing.__dict__.update(real_typing.__dict__)
    fast_sympy.sympify, fast_typing.get_type_hints = sympify, get_type_hints
    serialize.sympy, serialize.typing = fast_sympy, fast_typing
    if callable(real_parse):
        cls._parse_sym_expr = parse_sym_expr
    try:
        yield
    finally:
        serialize.sympy, serialize.typing = real_sympy, real_typing
        if callable(real_parse):
            cls._parse_sym_expr = real_parse
