"""Annotate: mark each linear site the spec adapts with ``node.meta['lrc'] = SiteMark``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..errors import SpecError
from ..ir import META_KEY, SiteMark, lrc_meta
from ..methods.base import AdapterMethod, get_method
from ..sites import Site, find_sites
from ..spec import Spec, nearby_names
from .manager import PassResult


@dataclass(frozen=True)
class SiteDecision:
    """For ``lrc inspect``: a site, the rule that matched it (or None), and why it is not adapted."""

    site: Site
    rule: int | None
    reason: str | None


def decide(gm: fx.GraphModule, spec: Spec) -> list[SiteDecision]:
    """What the spec does to each site; no changes to the graph."""
    out: list[SiteDecision] = []
    for site in find_sites(gm):
        hit = spec.rule_for(site.name)
        if hit is None:
            out.append(SiteDecision(site, None, "no rule matches"))
            continue
        i, rule = hit
        if rule.exclude:
            out.append(SiteDecision(site, i, f"excluded by rule {i + 1} ({rule})"))
        elif rule.full:
            out.append(SiteDecision(site, i, f"trained fully by rule {i + 1} ({rule})"))
        elif not rule.adapts:
            out.append(SiteDecision(site, i, f"skipped by rule {i + 1} ({rule})"))
        elif site.refused:
            out.append(SiteDecision(site, i, f"refused: {site.refused}"))
        else:
            out.append(SiteDecision(site, i, None))
    return out


def decide_full(gm: fx.GraphModule, spec: Spec) -> list[tuple[str, int]]:
    """``(module path, rule index)`` of each module a ``full`` rule makes trainable (outermost only).

    Any module with parameters is a candidate, found by its path in the GraphModule. The first rule
    matching the path decides it; rules that adapt only decide linear sites, so ``*:lora`` does not
    shadow ``*LayerNorm:full`` for a LayerNorm.
    """
    if not any(r.full for r in spec.rules):
        return []
    sites = {s.name for s in find_sites(gm)}
    out: list[tuple[str, int]] = []
    for path, mod in gm.named_modules():
        if not path or isinstance(mod, AdapterMethod) or any(path.startswith(p + ".") for p, _ in out):
            continue
        if next(mod.parameters(), None) is None:
            continue
        for i, rule in enumerate(spec.rules):
            if rule.matches(path) and (rule.full or not rule.adapts or path in sites):
                if rule.full:
                    out.append((path, i))
                break
    return out


def match(gm: fx.GraphModule, spec: Spec) -> PassResult:
    """Mark adapted sites; validate every rule and site, raising one SpecError listing all problems.

    Cases:
      1. a site's first matching rule adapts → mark it.
      2. excluded / skipped / refused sites → no mark (reasons kept for inspect).
      3. a module whose first matching rule is ``full`` → its path goes to ``lrc_meta(gm)["full_modules"]``
         (the ``full`` pass makes it trainable); it may not contain an adapted site.
    A graph whose sites already carry marks for this spec is left as is: ``modified=False``.
    """
    decisions = decide(gm, spec)
    full = decide_full(gm, spec)
    problems: list[str] = []
    used = {d.rule for d in decisions if d.rule is not None} | {i for _, i in full}
    names = [d.site.name for d in decisions]
    for i, rule in enumerate(spec.rules):
        if i not in used:
            pool = [n for n, m in gm.named_modules() if n and next(m.parameters(), None) is not None] \
                if rule.full else names
            near = ", ".join(nearby_names(rule.pattern, pool)) or "(the model has no linear sites)"
            what = "module" if rule.full else "site"
            problems.append(f"rule {i + 1} '{rule}' matched no {what}; nearby {what} names: {near}")
    for d in decisions:
        if d.reason is None:
            rule = spec.rules[d.rule]
            err = get_method(rule.method).check_site(rule.args, d.site.info())
            if err:
                problems.append(err)
    problems += [f"rule {i + 1} '{spec.rules[i]}' trains {path} fully, but it contains the adapted site {d.site.name}; "
                 f"adapt the site or train the module, not both" for path, i in full for d in decisions
                 if d.reason is None and d.site.name.startswith(path + ".")]
    if problems:
        raise SpecError("; ".join(problems) if len(problems) == 1 else "\n  - " + "\n  - ".join(problems))
    modified = False
    for d in decisions:
        if d.reason is not None:
            continue
        rule = spec.rules[d.rule]
        mark = SiteMark(d.site.name, d.rule, rule.method, tuple(rule.args.items()))
        if d.site.node.meta.get(META_KEY) != mark:
            d.site.node.meta[META_KEY] = mark
            modified = True
    known = lrc_meta(gm).setdefault("full_modules", [])
    added = [path for path, _ in full if path not in known]
    known += added
    modified = modified or bool(added)
    lrc_meta(gm).setdefault("specs", [])
    if str(spec) not in lrc_meta(gm)["specs"]:
        lrc_meta(gm)["specs"].append(str(spec))
    return PassResult(gm, modified)
