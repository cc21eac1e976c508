"""The one check for names that come from a file and may reach generated Python (issue 19).

torch.fx writes a GraphModule's ``forward`` as Python source: node names become variables, placeholder
targets become parameters, keyword names become ``k=...``, and ``get_attr`` / ``call_module`` targets
become ``self.a.b`` or, for a segment that is not an identifier, ``getattr(self.a, "<segment>")``
without escaping. A name holding a quote and a newline therefore becomes statements. Every name
read from a file passes :func:`check_path` before torch or lrc builds a graph from it, and every
GraphModule built from a file passes :func:`check_graph` before it is returned.

A *name path* is 1-64 dot-separated segments, each a Python identifier that is neither a keyword
nor a dunder (``__x__``), or a decimal index (``layer.0.weight``); at most :data:`MAX_NAME` characters.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from torch import fx

from lowrank_compiler.errors import LoadError

MAX_NAME = 1024
MAX_SEGMENTS = 64
_SEGMENT = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,254}|0|[1-9][0-9]{0,8})\Z", re.ASCII)


def path_problem(name: object, *, dotted: bool = True, empty: bool = False) -> str | None:
    """Why ``name`` is not a safe name path (or a plain identifier when ``dotted=False``), or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if name == "" and empty:
        return None
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    segments = name.split(".")
    if len(segments) > (MAX_SEGMENTS if dotted else 1):
        return "has too many dotted segments" if dotted else "is not a plain identifier"
    for seg in segments:
        if not _SEGMENT.match(seg):
            return f"has segment {seg[:40]!r}, which is not a Python identifier or an index"
        if keyword.iskeyword(seg) or (seg.startswith("__") and seg.endswith("__")):
            return f"has segment {seg!r}, a Python keyword or dunder"
        if not dotted and seg.isdigit():
            return "is not a plain identifier"
    return None


def check_path(name: object, where: str, *, dotted: bool = True, empty: bool = False) -> str:
    """``name`` if it is a safe name path; else LoadError naming ``where`` and the rule."""
    why = path_problem(name, dotted=dotted, empty=empty)
    if why:
        kind = "a dotted name like encoder.layer.0.weight" if dotted else "a Python identifier like linear_1"
        raise LoadError(f"{where}: name {str(name)[:60]!r} {why}; names from files must be {kind} "
                        "(no quotes, spaces, keywords or dunders)")
    return name  # type: ignore[return-value]


def check_graph(gm: fx.GraphModule, source: str) -> fx.GraphModule:
    """Refuse a GraphModule whose generated code would contain a name that is not a safe name path.

    Checks every node name, placeholder and call_method target (identifiers), every get_attr and
    call_module target (name paths), every keyword-argument name, and the forward's argument names.
    """
    for node in gm.graph.nodes:
        check_path(node.name, f"{source}: graph node", dotted=False)
        if node.op in ("placeholder", "call_method"):
            check_path(node.target, f"{source}: {node.op} {node.name}", dotted=False)
        elif node.op in ("get_attr", "call_module"):
            check_path(node.target, f"{source}: {node.op} {node.name}")
        for key in _kwarg_names(node.kwargs):
            check_path(key, f"{source}: keyword argument of {node.name}", dotted=False)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    for arg in getattr(info, "orig_args", None) or ():
        check_path(arg, f"{source}: forward argument", dotted=False)
    return gm


def _kwarg_names(kwargs: Any) -> list[str]:
    return list(kwargs) if isinstance(kwargs, dict) else []
