"""What a spec does to a model, as a table (`lrc inspect`)."""

from __future__ import annotations

from torch import fx, nn

from lowrank_compiler.ir import adapter_sites, lrc_meta
from lowrank_compiler.spec.decide import decide, decide_full
from lowrank_compiler.spec.language import parse_spec
from lowrank_compiler.spec.sites import find_sites


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
    out = ["", f"the model already has {len(sites)} adapter(s)"
           + (f" and {len(full)} fully trained module(s)" if full else "") + ":"]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(3, "  ".join("-" * w for w in widths))
    out.append(f"trainable params in them: {sum(int(r[3].replace(',', '')) for r in rows[1:]):,}")
    return out


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
                rank = mod.final_rank()
                note += "" if rank is None else f", rank now {rank}"
            rows.append((s.name, f"{s.d_out}x{s.d_in}", s.layout, "-", "-", note))
        listed = {r[0] for r in rows}
        for site, mod in existing.items():  # adapted sites (their linear is now an adapter call)
            if site not in listed:
                rank = mod.final_rank()
                note = f"{sum(p.numel() for p in mod.parameters() if p.requires_grad):,}" + (
                    "" if rank is None else f"; rank now {rank}")
                rows.append((site, f"{mod.d_out}x{mod.d_in}", "adapter", "-", mod.name, note))
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
        full = decide_full(gm, parsed, {d.site.name for d in decisions})
        unused = set(range(len(parsed.rules))) - {d.index for d in decisions if d.index is not None} \
            - {i for _, i in full}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = sum(p.numel() for p in gm.parameters())
    lines.append(f"{len(rows) - 1} linear sites; base params {base:,}")
    lines += existing_adapters(gm)
    if spec is not None:
        lines.append(f"adapter params {total:,} ({100 * total / max(base, 1):.3f}% of base)")
        for path, i in full:
            n = sum(p.numel() for p in gm.get_submodule(path).parameters())
            total += n
            lines.append(f"trained in full by rule {i + 1} ({parsed.rules[i]}): {path}, {n:,} params")
        if full:
            lines.append(f"trainable params with the fully trained modules: {total:,}")
        for i in sorted(unused):
            lines.append(f"warning: rule {i + 1} '{parsed.rules[i]}' matches no site")
    return "\n".join(lines)


def trainable_parameters(gm: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    return trainable, total


def print_trainable_parameters(gm: nn.Module) -> str:
    """Print and return 'trainable params: N || all params: M || trainable%: P' (PEFT's format)."""
    t, a = trainable_parameters(gm)
    line = f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / max(a, 1):.4f}"
    print(line)
    return line
