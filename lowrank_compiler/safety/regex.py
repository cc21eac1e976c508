"""Refuse regular expressions whose backtracking can blow up (``re:(.*.*)*x``).

Python's ``re`` backtracks, so a pattern can take exponential time on a short name. Site names
are short (tens of characters), so polynomial blow-up of low degree is harmless; what must not
reach the matcher is exponential behaviour. :func:`pattern_problem` walks the parsed pattern and
refuses the constructs that cause it:

- a variable repeat (``*``, ``+``, ``?``, ``{n,m}``) inside an unbounded or large repeat:
  ``(a+)+``, ``(.*.*)*``, ``(a?){30}``;
- an alternation inside an unbounded or large repeat: ``(a|a)*``;
- backreferences and conditional groups (matching them is NP-hard in general);
- more than :data:`MAX_UNBOUNDED` unbounded repeats in all (``.*.*.*.*.*x`` is O(n^k));
- and, for the whole pattern, bounded repeats included, more than :data:`MAX_PATHS` ways to try it
  on a name of :data:`MAX_SUBJECT` characters (``.?`` 32 times then ``Z`` has 2^32): :func:`paths`
  bounds the number of match attempts a backtracking matcher can make, without running it.

:data:`MAX_PATHS` is a bound on work per name: the worst accepted pattern takes well under a second
per site name on one core. Names longer than :data:`MAX_SUBJECT` never match a pattern (:func:`fullmatch`).
"""

from __future__ import annotations

import math
import re
from typing import Any

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _p
except ImportError:  # pragma: no cover
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

MAX_UNBOUNDED = 4
MAX_LENGTH = 500
MAX_SUBJECT = 200
MAX_PATHS = 2_000_000
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)} - {None}


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` could make the backtracking matcher run for exponential time, or None."""
    if len(pattern) > MAX_LENGTH:
        return f"longer than {MAX_LENGTH} characters"
    try:
        tree = _p.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return str(e)
    count = [0]
    try:
        problem = _walk(tree, 0, 1, count) or (
            f"{count[0]} unbounded repeats (at most {MAX_UNBOUNDED}); backtracking over them can take very long"
            if count[0] > MAX_UNBOUNDED else None)
        if problem is None and paths(tree) > MAX_PATHS:
            problem = (f"up to {paths(tree):.2g} ways to try it on a {MAX_SUBJECT}-character name (at most "
                       f"{MAX_PATHS:.0e}); chains of optional or repeated atoms like .?.?.?... backtrack too much")
        return problem
    except RecursionError:
        return "nested too deeply"


def fullmatch(pattern: str, name: str) -> bool:
    """``re.fullmatch`` of a pattern :func:`pattern_problem` accepted, on names within the bound."""
    return len(name) <= MAX_SUBJECT and re.fullmatch(pattern, name) is not None


def _geometric(c: float, lo: int, hi: int) -> float:
    """sum(c**k for k in lo..hi), or inf when it would overflow."""
    if c <= 1:
        return max(hi - lo + 1, 1)
    if hi * math.log(c) > 690:
        return float("inf")
    return sum(c ** k for k in range(lo, hi + 1))


def suffix_match(pattern: str, name: str) -> bool:
    """Whether ``pattern`` fully matches ``name`` or a dot-aligned suffix of it (PEFT's pattern keys),
    without the ``(.*\\.)?`` prefix PEFT adds (it would multiply the backtracking bound)."""
    parts = name.split(".")
    return any(fullmatch(pattern, ".".join(parts[i:])) for i in range(len(parts)))


def paths(items: Any, n: int = MAX_SUBJECT) -> float:
    """An upper bound on the match attempts a backtracking matcher makes for ``items`` (a parsed
    pattern) on a name of ``n`` characters: alternatives add, a sequence multiplies, a repeat of a
    sub-pattern with c attempts tried k = lo..hi times costs sum c^k. In a sequence, repeats of a
    single fixed-width atom only choose how many characters each takes, so jointly they have at most
    C(n + k, k) choices (n characters split among k of them), which is used when smaller."""
    total, splits, simple = 1.0, 0, 1.0
    for op, av in items:
        if op in _REPEATS:
            lo, hi, sub = av
            hi = min(hi, n)
            c = paths(sub, n)
            lo_w, hi_w = sub.getwidth() if hasattr(sub, "getwidth") else (0, 1)
            if c == 1 and lo != hi and lo_w == hi_w > 0:
                splits, simple = splits + 1, simple * (hi - lo + 1)
            else:
                total *= _geometric(c, lo, hi)
        elif op == _c.SUBPATTERN:
            total *= paths(av[-1], n)
        elif op == _c.BRANCH:
            total *= sum(paths(alt, n) for alt in av[1])
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            total *= paths(av[1], n)
        elif op == getattr(_c, "ATOMIC_GROUP", None):
            total *= paths(av, n)
        if total > 1e300:
            return float("inf")
    return total * min(simple, math.comb(n + splits, splits))


def _walk(items: Any, depth: int, mult: float, count: list[int]) -> str | None:
    """``mult``: how many times the enclosing repeats may run this part (inf when unbounded)."""
    if depth > 50:
        return "nested too deeply"
    for op, av in items:
        if op in _REPEATS:
            lo, hi, sub = av
            unbounded = hi == _c.MAXREPEAT or hi > 1000
            if unbounded:
                count[0] += 1
            if lo != hi and mult > MAX_UNBOUNDED:
                return ("a variable repeat nested inside a large or unbounded repeat (like (a+)+, (.*.*)* or "
                        "(a?){30}) can take exponential time")
            err = _walk(sub, depth + 1, mult * (float("inf") if unbounded else max(hi, 1)), count)
            if err:
                return err
        elif op == _c.SUBPATTERN:
            err = _walk(av[-1], depth + 1, mult, count)
            if err:
                return err
        elif op == _c.BRANCH:
            if mult > MAX_UNBOUNDED:
                return "an alternation inside a large or unbounded repeat (like (a|a)*) can take exponential time"
            for alt in av[1]:
                err = _walk(alt, depth + 1, mult, count)
                if err:
                    return err
        elif op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            return "backreferences and conditional groups are not supported in site patterns"
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            err = _walk(av[1], depth + 1, mult, count)
            if err:
                return err
        elif op == getattr(_c, "ATOMIC_GROUP", None):
            err = _walk(av, depth + 1, mult, count)
            if err:
                return err
    return None
