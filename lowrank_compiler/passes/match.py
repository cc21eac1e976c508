"""Annotate: mark each linear site the spec adapts with ``node.meta['lrc'] = SiteMark``."""

from __future__ import annotations

from torch import fx

from lowrank_compiler.errors import SpecError
from lowrank_compiler.ir import META_KEY, SiteMark, lrc_meta
from lowrank_compiler.passes.manager import PassResult
from lowrank_compiler.spec.decide import decide, decide_full
from lowrank_compiler.spec.language import Spec, nearby_names
from lowrank_compiler.spec.sites import find_sites


def match(gm: fx.GraphModule, spec: Spec) -> PassResult:
    """Mark adapted sites; validate every rule and site, raising one SpecError listing all problems.

    Cases:
      1. a site's first matching rule adapts → mark it.
      2. excluded / skipped / refused sites → no mark (reasons kept for inspect).
      3. a module whose first matching rule is ``full`` → its path goes to ``lrc_meta(gm)["full_modules"]``
         (the ``full`` pass makes it trainable); it may not contain an adapted site.
    A graph whose sites already carry marks for this spec is left as is: ``modified=False``.
    """
    decisions = [decide(site, spec) for site in find_sites(gm)]
    names = [d.site.name for d in decisions]
    full = decide_full(gm, spec, set(names))
    problems: list[SpecError] = [d.problem for d in decisions if d.problem is not None]
    used = {d.index for d in decisions if d.index is not None} | {i for _, i in full}
    for i, rule in enumerate(spec.rules):
        if i not in used:
            what = "module" if rule.full else "site"
            pool = [n for n, m in gm.named_modules() if n and next(m.parameters(), None) is not None] \
                if rule.full else names
            near = ", ".join(nearby_names(rule.pattern, pool)) or f"(the model has no {what}s to match)"
            problems.append(SpecError(f"rule {i + 1} '{rule}' matched no {what}; nearby {what} names: {near}",
                                      spec.text or str(spec), rule.column))
    problems += [SpecError(f"rule {i + 1} '{spec.rules[i]}' trains {path} in full, but it contains the adapted "
                           f"site {d.site.name}; adapt the site or train the module, not both",
                           spec.text or str(spec), spec.rules[i].column)
                 for path, i in full for d in decisions if d.adapts and d.site.name.startswith(path + ".")]
    for i in sorted(used - {d.index for d in decisions if d.adapts}):
        rule = spec.rules[i]
        refused = [d for d in decisions if d.index == i and d.site.refused]
        if refused and rule.adapts:
            problems.append(SpecError(f"rule {i + 1} '{rule}' matches only sites that cannot be adapted: "
                                      f"{refused[0].site.name}: {refused[0].site.refused}",
                                      spec.text or str(spec), rule.column))
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
    known = lrc_meta(gm).setdefault("full_modules", [])
    added = [path for path, _ in full if path not in known]
    known += added
    modified = modified or bool(added)
    specs = lrc_meta(gm).setdefault("specs", [])
    if str(spec) not in specs:
        specs.append(str(spec))
    return PassResult(gm, modified)
