"""Annotate: mark each linear site the spec adapts with ``node.meta['lrc'] = SiteMark``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..errors import SpecError
from ..ir import META_KEY, SiteMark, lrc_meta
from ..methods.base import get_method
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
        elif not rule.adapts:
            out.append(SiteDecision(site, i, f"skipped by rule {i + 1} ({rule})"))
        elif site.refused:
            out.append(SiteDecision(site, i, f"refused: {site.refused}"))
        else:
            out.append(SiteDecision(site, i, None))
    return out


def match(gm: fx.GraphModule, spec: Spec) -> PassResult:
    """Mark adapted sites; validate every rule and site, raising one SpecError listing all problems.

    Cases:
      1. a site's first matching rule adapts → mark it.
      2. excluded / skipped / refused sites → no mark (reasons kept for inspect).
    A graph whose sites already carry marks for this spec is left as is: ``modified=False``.
    """
    decisions = decide(gm, spec)
    problems: list[str] = []
    used = {d.rule for d in decisions if d.rule is not None}
    names = [d.site.name for d in decisions]
    for i, rule in enumerate(spec.rules):
        if i not in used:
            near = ", ".join(nearby_names(rule.pattern, names)) or "(the model has no linear sites)"
            problems.append(f"rule {i + 1} '{rule}' matched no site; nearby site names: {near}")
    adapted = {d.rule for d in decisions if d.reason is None}
    for i in sorted(used - adapted):
        refused = [d for d in decisions if d.rule == i and d.site.refused]
        if refused and spec.rules[i].adapts and not spec.rules[i].exclude:
            problems.append(f"rule {i + 1} '{spec.rules[i]}' matches only sites that cannot be adapted: "
                            f"{refused[0].site.name}: {refused[0].site.refused}")
    for d in decisions:
        if d.reason is None:
            rule = spec.rules[d.rule]
            err = get_method(rule.method).check_site(rule.args, d.site.info())
            if err:
                problems.append(err)
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
    lrc_meta(gm).setdefault("specs", [])
    if str(spec) not in lrc_meta(gm)["specs"]:
        lrc_meta(gm)["specs"].append(str(spec))
    return PassResult(gm, modified)
