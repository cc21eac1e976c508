"""Refuse regular expressions whose backtracking can blow up (``re:(.*.*)*x``).

Python's ``re`` backtracks, so a pattern can take exponential time on a short name. Site names
are short (tens of characters), so polynomial blow-up of low degree is harmless; what must not
reach the matcher is exponential behaviour. :func:`pattern_problem` walks the parsed pattern and
refuses the constructs that cause it:

- a variable repeat (``*``, ``+``, ``?``, ``{n,m}``) inside an unbounded or large repeat:
  ``(a+)+``, ``(.*.*)*``, ``(a?){30}``;
- an alternation inside an unbounded or large repeat: ``(a|a)*``;
- backreferences and conditional groups (matching them is NP-hard in general);
- more than :data:`MAX_UNBOUNDED` unbounded repeats in all (``.*.*.*.*.*x`` is O(n^k)).
"""

from __future__ import annotations

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
        return _walk(tree, 0, 1, count) or (
            f"{count[0]} unbounded repeats (at most {MAX_UNBOUNDED}); backtracking over them can take very long"
            if count[0] > MAX_UNBOUNDED else None)
    except RecursionError:
        return "nested too deeply"


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
