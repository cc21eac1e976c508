"""The spec-argument schema of a method: :class:`Arg`, the value checks, and did-you-mean suggestions."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arg:
    """One spec argument of a method: default, accepted types, and a range check.

    ``check`` returns an error string (what was expected) or None when the value is fine.
    """

    default: Any
    types: tuple[type, ...]
    check: Callable[[Any], str | None] | None = None
    doc: str = ""
    #: the spec must give it (``default`` is then None)
    required: bool = False


def suggest(word: str, options: list[str] | tuple[str, ...] | dict) -> str:
    """' (did you mean X?)' for the closest option, or ''."""
    opts = list(options)
    close = difflib.get_close_matches(word, opts, n=1)
    if not close:
        close = [o for o in opts if word.startswith(o) or o.startswith(word)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


#: largest magnitude a float spec argument may have: a scale beyond it overflows float32 (max ~3.4e38)
#: as soon as it multiplies adapter weights, giving inf/NaN outputs
MAX_FLOAT_ARG = 1e12
INT_ARG_RANGE = (-(2**63), 2**63 - 1)


def _number_range(v: Any) -> str | None:
    """Generic check for every numeric spec argument: floats finite and not huge, ints fit int64."""
    if isinstance(v, float) and not math.isfinite(v):
        return "must be a finite number"
    if isinstance(v, float) and abs(v) > MAX_FLOAT_ARG:
        return f"is too large (at most {MAX_FLOAT_ARG:g} in magnitude: larger scales overflow float32)"
    if isinstance(v, int) and not isinstance(v, bool) and not INT_ARG_RANGE[0] <= v <= INT_ARG_RANGE[1]:
        return "does not fit a 64-bit integer"
    return None


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def probability(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check
