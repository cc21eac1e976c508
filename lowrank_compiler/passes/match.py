"""Annotate: mark each linear site the spec adapts with ``node.meta['lrc'] = SiteMark``."""

from __future__ import annotations

from torch import fx

from ..decide import decide
from ..errors import SpecError
from ..ir import META_KEY, SiteMark, lrc_meta
from ..sites import find_sites
from ..spec import Spec, nearby_names
from .manager import PassResult


def match(gm: fx.GraphModule, spec: Spec) -> PassResult:
    """Mark adapted sites; validate every rule and site, raising one SpecError listing all problems.

    Cases:
      1. a site's first matching rule adapts → mark it.
      2. excluded / skipped / refused sites → no mark (reasons kept for inspect).
    A graph whose sites already carry marks for this spec is left as is: ``modified=False``.
    """
    decisions = [decide(site, spec) for site in find_sites(gm)]
    problems: list[SpecError] = [d.problem for d in decisions if d.problem is not None]
    used = {d.index for d in decisions if d.index is not None}
    names = [d.site.name for d in decisions]
    for i, rule in enumerate(spec.rules):
        if i not in used:
            near = ", ".join(nearby_names(rule.pattern, names)) or "(the model has no linear sites)"
            problems.append(SpecError(f"rule {i + 1} '{rule}' matched no site; nearby site names: {near}",
                                      spec.text or str(spec), rule.column))
    adapted = {d.index for d in decisions if d.adapts}
    for i in sorted(used - adapted):  # a rule that adapts, yet every site it matched was refused (tied ...)
        refused = [d for d in decisions if d.index == i and d.site.refused]
        if refused and spec.rules[i].adapts and not spec.rules[i].exclude:
            problems.append(SpecError(f"rule {i + 1} '{spec.rules[i]}' matches only sites that cannot be adapted: "
                                      f"{refused[0].site.name}: {refused[0].site.refused}",
                                      spec.text or str(spec), spec.rules[i].column))
    if problems:
        first = problems[0]
        if len(problems) == 1:
            raise first
        reasons = "\n  - ".join(p.reason for p in problems)
        raise SpecError(f"{len(problems)} problems:\n  - {reasons}\nfirst one at", first.spec, first.column)
    modified = False
    for d in decisions:
        if not d.adapts:
            continue
        mark = SiteMark(d.site.name, d.index, d.rule.method, tuple(d.rule.args.items()))
        if d.site.node.meta.get(META_KEY) != mark:
            d.site.node.meta[META_KEY] = mark
            modified = True
    specs = lrc_meta(gm).setdefault("specs", [])
    if str(spec) not in specs:
        specs.append(str(spec))
    return PassResult(gm, modified)
