"""What a spec does to a model, as a table (`lrc inspect`)."""

from __future__ import annotations

from torch import fx

from .errors import LrcError
from .ir import adapter_sites, lrc_meta
from .methods.base import get_method
from .passes.match import decide
from .sites import find_sites
from .spec import parse_spec


def added_params(method: str, args: dict, site_info) -> int:
    """Trainable parameters one adapter would add at a site."""
    mod = get_method(method)(site_info, **args)
    return sum(p.numel() for p in mod.parameters() if p.requires_grad)


def existing_adapters(gm: fx.GraphModule) -> list[str]:
    """Lines listing the adapters and fully trained modules ``gm`` already has (a saved model), or none."""
    sites = adapter_sites(gm)
    full = list(lrc_meta(gm).get("full_modules", []))
    if not sites and not full:
        return []
    rows = [("adapter site", "shape (out x in)", "method", "params", "state")]
    for _, mark, mod in sites:
        args = ", ".join(f"{k}={v!r}" for k, v in mod.config.items())
        n = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        rows.append((mark.site, f"{mod.d_out}x{mod.d_in}", f"{mark.method}({args})", f"{n:,}",
                     "merged" if mod.merged else "separate"))
    for path in full:
        n = sum(p.numel() for p in gm.get_submodule(path).parameters())
        rows.append((path, "-", "full", f"{n:,}", "trained in full"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["", f"the model already has {len(sites)} adapter(s)" + (f" and {len(full)} fully trained module(s)"
                                                                  if full else "") + ":"]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(3, "  ".join("-" * w for w in widths))
    trainable = sum(int(r[3].replace(",", "")) for r in rows[1:])
    out.append(f"trainable params in them: {trainable:,}")
    return out


def inspect_table(gm: fx.GraphModule, spec: str | None = None) -> str:
    """One row per linear site: name, shape, layout, rule, method, added params (or why not adapted)."""
    rows = [("site", "shape (out x in)", "layout", "rule", "method", "+params / note")]
    total = 0
    if spec is None:
        for s in find_sites(gm):
            rows.append((s.name, f"{s.d_out}x{s.d_in}", s.layout, "-", "-", s.refused or ""))
    else:
        parsed = parse_spec(spec)
        decisions = decide(gm, parsed)
        for d in decisions:
            s = d.site
            rule = "-" if d.rule is None else str(d.rule + 1)
            if d.reason is None:
                r = parsed.rules[d.rule]
                err = get_method(r.method).check_site(r.args, s.info())
                if err:
                    raise LrcError(err)
                n = added_params(r.method, r.args, s.info())
                total += n
                rows.append((s.name, f"{s.d_out}x{s.d_in}", s.layout, rule, str(parsed.rules[d.rule]), f"{n:,}"))
            else:
                rows.append((s.name, f"{s.d_out}x{s.d_in}", s.layout, rule, "-", d.reason))
        unused = set(range(len(parsed.rules))) - {d.rule for d in decisions if d.rule is not None}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = sum(p.numel() for p in gm.parameters())
    lines.append(f"{len(rows) - 1} linear sites; base params {base:,}")
    lines += existing_adapters(gm)
    if spec is not None:
        lines.append(f"adapter params {total:,} ({100 * total / max(base, 1):.3f}% of base)")
        for i in sorted(unused):
            lines.append(f"warning: rule {i + 1} '{parsed.rules[i]}' matches no site")
    return "\n".join(lines)
