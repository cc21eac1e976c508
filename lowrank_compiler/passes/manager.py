"""The pass manager: every pipeline (transform, load, merge, export, compile) is a named list of passes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import fx

from lowrank_compiler import ir


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) GraphModule and whether it changed anything."""

    gm: fx.GraphModule
    modified: bool


@dataclass(frozen=True)
class Pass:
    """One step of a pipeline: ``fn(gm) -> PassResult``.

    ``inplace`` says whether ``fn`` rewrites the GraphModule it is given (True) or returns a new
    one and leaves its input untouched (False). Copies are made at the API edge, never by a pass
    that says it works in place.
    """

    name: str
    fn: Callable[[fx.GraphModule], PassResult]
    inplace: bool = True


@dataclass
class Pipeline:
    """A named list of passes run in order; ``ir.verify`` runs after each when ``verify`` is on."""

    name: str
    passes: Sequence[Pass]
    verify: bool | None = None
    trace: list[str] = field(default_factory=list)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        check = verify_enabled() if self.verify is None else self.verify
        modified, done = False, []
        for p in self.passes:
            try:
                res = p.fn(gm)
                if check:
                    ir.verify(res.gm)
            except Exception as e:
                # keep the exception's type and attributes (SpecError.column ...); say where it happened
                e.add_note(f"in pass {p.name!r} of pipeline {self.name!r} (after: {', '.join(done) or 'none'})")
                raise
            gm, modified = res.gm, modified or res.modified
            done.append(p.name)
        self.trace[:] = done
        return PassResult(gm, modified)


_VERIFY: list[bool] = [os.environ.get("LRC_VERIFY", "") not in ("", "0")]


def verify_enabled() -> bool:
    """Whether pipelines run ``ir.verify`` after every pass (``LRC_VERIFY=1``; the test suite turns it on)."""
    return _VERIFY[0]


def set_verify(on: bool) -> None:
    """Turn per-pass ``ir.verify`` on or off for every pipeline."""
    _VERIFY[0] = bool(on)


@contextmanager
def verification(on: bool) -> Iterator[None]:
    """Turn per-pass ``ir.verify`` on or off inside the block (e.g. off while a graph is mid-construction)."""
    was = _VERIFY[0]
    _VERIFY[0] = bool(on)
    try:
        yield
    finally:
        _VERIFY[0] = was


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], name: str = "pipeline") -> PassResult:
    """Run ``passes`` on ``gm`` as one :class:`Pipeline`."""
    return Pipeline(name, passes)(gm)
