"""What a spec does to one linear site (and which modules its ``full`` rules train), decided once for
match, ``lrc inspect``, load and load_peft."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from lowrank_compiler.errors import SpecError
from lowrank_compiler.methods.base import AdapterMethod, get_method
from lowrank_compiler.spec.language import Rule, Spec
from lowrank_compiler.spec.sites import Site


@dataclass
class Decision:
    """The outcome for one site.

    ``rule``/``index``: the first rule whose pattern matches (None: no rule matches). ``reason``: why the
    site is not adapted (excluded, skipped, refused, no rule), None when it is. ``problem``: the method's
    objection to this site (e.g. r too large), a :class:`SpecError` with the rule's column, or None.
    """

    site: Site
    spec: Spec
    index: int | None
    rule: Rule | None
    reason: str | None
    problem: SpecError | None

    @property
    def adapts(self) -> bool:
        return self.reason is None and self.problem is None

    @cached_property
    def added_params(self) -> int:
        """Trainable parameters the adapter adds at this site (0 when not adapted); the global RNG is untouched."""
        if not self.adapts:
            return 0
        with torch.random.fork_rng(devices=[]):
            mod = get_method(self.rule.method)(self.site.info(), **self.rule.args)
        return sum(p.numel() for p in mod.parameters() if p.requires_grad)


def decide_full(gm: nn.Module, spec: Spec, sites: set[str]) -> list[tuple[str, int]]:
    """``(module path, rule index)`` of each module a ``full`` rule trains (outermost only).

    Any module with parameters is a candidate, found by its path in ``gm``. The first rule matching the
    path decides it; rules that adapt decide only linear sites (``sites``: their names), so ``*:lora``
    does not shadow ``*LayerNorm:full`` for a LayerNorm.
    """
    if not any(r.full for r in spec.rules):
        return []
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


def decide(site: Site, spec: Spec) -> Decision:
    """Apply ``spec`` to ``site``: the first matching rule decides (adapt, exclude, skip), then the method
    checks the site (``check_site``)."""
    hit = spec.rule_for(site.name)
    if hit is None:
        return Decision(site, spec, None, None, "no rule matches", None)
    i, rule = hit
    if rule.exclude:
        return Decision(site, spec, i, rule, f"excluded by rule {i + 1} ({rule})", None)
    if rule.full:
        return Decision(site, spec, i, rule, f"trained in full by rule {i + 1} ({rule})", None)
    if not rule.adapts:
        return Decision(site, spec, i, rule, f"skipped by rule {i + 1} ({rule})", None)
    if site.refused:
        return Decision(site, spec, i, rule, f"refused: {site.refused}", None)
    err = get_method(rule.method).check_site(rule.args, site.info())
    problem = SpecError(err, spec.text or str(spec), rule.column) if err else None
    return Decision(site, spec, i, rule, None, problem)
