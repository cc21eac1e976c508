"""Keep third-party chatter (FutureWarnings from torch internals, the ONNX exporter's registry log,
transformers progress bars) out of lrc's save/load/export; lrc's own messages are unaffected."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# loggers whose INFO/WARNING lines are about the libraries' own set-up, not the user's model
_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
            "onnxscript", "onnx_ir", "transformers")
_CATEGORIES = (FutureWarning, DeprecationWarning, UserWarning)


def verbose() -> bool:
    """``LRC_VERBOSE=1`` shows everything the libraries say."""
    return os.environ.get("LRC_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside: warnings raised outside lowrank_compiler and library log lines below ERROR are dropped."""
    if verbose():
        yield
        return
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    bars = _hf_bars(False)
    try:
        with warnings.catch_warnings():
            for cat in _CATEGORIES:
                warnings.filterwarnings("ignore", category=cat)
                warnings.filterwarnings("default", category=cat, module=r"lowrank_compiler(\..*)?$")
            for name in _LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        _hf_bars(bars)


def quiet(fn: F) -> F:
    """Decorator form of :func:`quiet_third_party`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quiet_third_party():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _hf_bars(on: bool) -> bool:
    """Set transformers' progress bars on/off; returns whether they were on (False while it is not imported)."""
    if "transformers" not in sys.modules:
        return False
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    return was
