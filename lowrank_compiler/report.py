"""What a spec does to a model, as a table (`lrc inspect`)."""

from __future__ import annotations

from torch import fx

from .decide import decide
from .ir import adapter_sites
from .sites import find_sites
from .spec import parse_spec


def inspect_table(gm: fx.GraphModule, spec: str | None = None) -> str:
    """One row per linear site: name, shape, layout, rule, method, added params (or why not adapted).

    Raises:
        SpecError: the spec does not parse, or a method refuses a site it matched (with the rule's caret).
    """
    rows = [("site", "shape (out x in)", "layout", "rule", "method", "+params / note")]
    total = 0
    existing = {mark.site: mod for _, mark, mod in adapter_sites(gm)}
    if spec is None:
        for s in find_sites(gm):
            note = s.refused or ""
            if s.name in existing:
                mod = existing[s.name]
                note = f"has {mod.name}({', '.join(f'{k}={v!r}' for k, v in mod.config.items())})"
            rows.append((s.name, f"{s.d_out}x{s.d_in}", s.layout, "-", "-", note))
    else:
        parsed = parse_spec(spec)
        decisions = [decide(s, parsed) for s in find_sites(gm)]
        for d in decisions:
            s = d.site
            rule = "-" if d.index is None else str(d.index + 1)
            if d.problem is not None:
                raise d.problem
            if d.adapts:
                total += d.added_params
                rows.append((s.name, f"{s.d_out}x{s.d_in}", s.layout, rule, str(d.rule), f"{d.added_params:,}"))
            else:
                rows.append((s.name, f"{s.d_out}x{s.d_in}", s.layout, rule, "-", d.reason))
        unused = set(range(len(parsed.rules))) - {d.index for d in decisions if d.index is not None}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = sum(p.numel() for p in gm.parameters())
    lines.append(f"{len(rows) - 1} linear sites; base params {base:,}")
    if spec is not None:
        lines.append(f"adapter params {total:,} ({100 * total / max(base, 1):.3f}% of base)")
        for i in sorted(unused):
            lines.append(f"warning: rule {i + 1} '{parsed.rules[i]}' matches no site")
    return "\n".join(lines)
