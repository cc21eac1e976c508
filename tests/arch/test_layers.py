"""The import layers of docs/DESIGN_NOTES.md, read from the source with ``ast``: no cycle between rooms, no import
that points up a layer, no pass importing another pass, in-function imports only of the package's own modules
where a heavy optional dependency or an entry point justifies them."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lowrank_compiler"
NAME = "lowrank_compiler"

#: room -> layer, lowest first; a room may import its own layer or any layer below it
LAYERS = {
    "errors": 1, "quiet": 1,
    "methods": 2,
    "ir": 3, "safety": 3,
    "spec": 4,
    "passes": 5,
    "frontend": 6, "lowerings": 6,
    "api": 7, "formats": 7,
    "adapter_sets": 8, "backends": 8, "training": 8, "demo": 8,
    "__init__": 9, "cli": 9,
}
#: imports that the layer numbers allow but the design forbids
FORBIDDEN = {("lowerings", "frontend"), ("lowerings", "formats"), ("lowerings", "adapter_sets"), ("formats", "backends")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, int, bool]]:
    """(importing module, imported module, line, inside a function) for every import of the package's own code."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        funcs = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    src = base + ("." + node.module if node.module else "")
                else:
                    src = node.module or ""
                if src == NAME:  # from lowrank_compiler import x: x names a room
                    targets = [f"{NAME}.{a.name}" for a in node.names
                               if (PKG / a.name).is_dir() or (PKG / f"{a.name}.py").is_file()]
                elif src.startswith(NAME + "."):
                    targets = [src]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(NAME + ".")]
            for t in targets:
                out.append((mod, t, node.lineno, id(node) in funcs))
    return out


def room_graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {r: set() for r in LAYERS}
    for a, b, _, _ in imports():
        ra, rb = _room(a), _room(b)
        if ra != rb:
            g.setdefault(ra, set()).add(rb)
    return g


def test_every_room_has_a_layer():
    rooms = {_room(_module_name(p)) for p in PKG.rglob("*.py")}
    assert rooms <= set(LAYERS), f"rooms without a layer (add them to LAYERS and DESIGN_NOTES): {rooms - set(LAYERS)}"


def test_no_import_points_up_a_layer():
    bad = [f"{a}:{line} imports {b} (layer {LAYERS[_room(a)]} -> {LAYERS[_room(b)]})"
           for a, b, line, _ in imports() if LAYERS[_room(b)] > LAYERS[_room(a)]]
    assert not bad, "\n".join(bad)


def test_forbidden_edges():
    bad = [f"{a}:{line} imports {b}" for a, b, line, _ in imports() if (_room(a), _room(b)) in FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_no_cycle_between_rooms():
    g = room_graph()
    seen: dict[str, int] = {}

    def visit(r: str, stack: list[str]) -> None:
        seen[r] = 1
        for s in sorted(g.get(r, ())):
            if seen.get(s) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(s):], s]))
            if s not in seen:
                visit(s, [*stack, s])
        seen[r] = 2

    for r in sorted(g):
        if r not in seen:
            visit(r, [r])


def test_no_module_cycle():
    """Module-level imports (not in functions) form no cycle between modules either."""
    g: dict[str, set[str]] = {}
    for a, b, _, inner in imports():
        if not inner and a != b:
            g.setdefault(a, set()).add(b)
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for s in sorted(g.get(m, ())):
            if s not in g and s.rpartition(".")[0] in g and s not in seen:
                pass
            if seen.get(s) == 1:
                # a package importing its own submodule (re-export) is not a cycle
                if not (m.startswith(s + ".") or s.startswith(m + ".")):
                    raise AssertionError("module import cycle: " + " -> ".join([*stack[stack.index(s):], s]))
                continue
            if s not in seen:
                visit(s, [*stack, s])
        seen[m] = 2

    for m in sorted(g):
        if m not in seen:
            visit(m, [m])


def test_a_pass_never_imports_another_pass():
    combiners = {f"{NAME}.passes.manager", f"{NAME}.passes.pipelines", f"{NAME}.passes"}
    bad = [f"{a}:{line} imports {b}" for a, b, line, _ in imports()
           if a.startswith(f"{NAME}.passes.") and b.startswith(f"{NAME}.passes.")
           and a not in combiners and b not in combiners]
    assert not bad, "\n".join(bad)


def test_in_function_imports_of_own_modules_are_few():
    """Imports inside functions only where they break no cycle: entry points (cli, demo, __init__ aliases)."""
    inner = [f"{a}:{line} imports {b}" for a, b, line, is_inner in imports()
             if is_inner and _room(a) not in ("cli", "demo", "__init__")]
    assert not inner, "\n".join(inner)
