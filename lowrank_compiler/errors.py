"""The exceptions that make up lrc's error interface."""

from __future__ import annotations


class LrcError(Exception):
    """Base class of every error lrc raises on purpose."""


class SpecError(LrcError, ValueError):
    """A spec string (or its arguments) is malformed or does not fit the model.

    When the fault has a position, ``column`` is its 0-based offset in ``spec``
    and the message shows the spec with a caret under it.
    """

    def __init__(self, message: str, spec: str | None = None, column: int | None = None):
        self.reason = message
        self.spec = spec
        self.column = column
        if spec is not None and column is not None:
            line_start = spec.rfind("\n", 0, column) + 1
            line_end = spec.find("\n", column)
            line = spec[line_start : line_end if line_end != -1 else len(spec)]
            caret = " " * (column - line_start) + "^"
            message = f"{message} (column {column + 1})\n  {line}\n  {caret}"
        super().__init__(message)


class TraceError(LrcError, RuntimeError):
    """No tracing strategy could turn the model into a GraphModule."""


class LoadError(LrcError, ValueError):
    """A file could not be loaded as an lrc model, adapter set or HF directory."""


class ExportError(LrcError, RuntimeError):
    """An export or lowering step failed; no partial output was left behind."""


class InitError(LrcError, RuntimeError):
    """A data-dependent initialization could not run (missing data, non-finite gradients...)."""


class MergeError(LrcError, ValueError):
    """Folding an adapter into its base weight would give non-finite values; nothing was changed."""
