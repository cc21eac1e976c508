"""The AdapterMethod contract and the method registry."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import SpecError


@dataclass(frozen=True)
class Arg:
    """One spec argument of a method: default, accepted types, and a range check.

    ``check`` returns an error string (what was expected) or None when the value is fine.
    """

    default: Any
    types: tuple[type, ...]
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


def suggest(word: str, options: list[str] | tuple[str, ...] | dict) -> str:
    """' (did you mean X?)' for the closest option, or ''."""
    opts = list(options)
    close = difflib.get_close_matches(word, opts, n=1)
    if not close:
        close = [o for o in opts if word.startswith(o) or o.startswith(word)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


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


@dataclass
class StepContext:
    """What an adapter's training hooks may see of the optimizer step being taken.

    ``step`` is the 1-based index of this step; ``state(p)`` is the optimizer's (mutable) state
    dict for parameter ``p`` (clear it to restart its moments); ``group(p)`` is the param group
    holding ``p`` (``lr``, ``betas``, ``eps``, ``weight_decay`` ... as the base optimizer keeps them).
    """

    step: int
    state: Callable[[torch.Tensor], dict[str, Any]]
    group: Callable[[torch.Tensor], dict[str, Any]]


@dataclass
class SiteInfo:
    """What a method may know about the linear it adapts (no graph internals)."""

    name: str
    d_in: int
    d_out: int
    dtype: torch.dtype = torch.float32
    has_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class AdapterMethod(nn.Module):
    """An adapter that replaces one linear ``y = x Wᵀ + b``.

    Contract (DESIGN.md): it owns its trainable state, never the frozen base weight,
    which the graph passes in. Subclasses set ``name`` and ``args`` and implement
    ``forward(x, weight, bias)`` and ``delta_weight(weight)``.

    Optional hooks: ``initialize(stats, weight) -> new weight | None`` for data-dependent
    init (``data_dependent = True``), ``param_groups(lr)`` for per-tensor learning rates,
    ``init_from_base(weight)`` called once at insertion with the site's base weight (DoRA's
    magnitude), ``transform_grads(weight, ctx)`` before the optimizer step and
    ``after_step(weight, ctx) -> new base weight | None`` after it (``ctx`` is a StepContext;
    ``passes/train.py`` runs them).
    """

    name: ClassVar[str] = ""
    args: ClassVar[dict[str, Arg]] = {}
    data_dependent: ClassVar[bool] = False
    #: True when after_step / initialize may change the base weight.
    modifies_base: ClassVar[bool] = False

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__()
        self.site_name = site.name
        self.d_in = site.d_in
        self.d_out = site.d_out
        self.config = dict(kwargs)
        self.merged = False

    # -- argument handling -------------------------------------------------
    @classmethod
    def resolve_args(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, names/types/ranges checked; raises SpecError listing every problem."""
        problems: list[str] = []
        for key in given:
            if key not in cls.args:
                problems.append(
                    f"{cls.name}: unknown argument {key!r}{suggest(key, cls.args)}; valid: {', '.join(cls.args)}"
                )
        out: dict[str, Any] = {}
        for key, spec in cls.args.items():
            value = given.get(key, spec.default)
            if key in given:
                if float in spec.types and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                if isinstance(value, bool) and bool not in spec.types:
                    ok = False
                else:
                    ok = value is None and spec.default is None or isinstance(value, spec.types)
                if not ok:
                    want = " or ".join(t.__name__ for t in spec.types)
                    problems.append(f"{cls.name}: argument {key}={value!r} must be {want}")
                    continue
                if spec.check is not None and value is not None:
                    err = spec.check(value)
                    if err:
                        problems.append(f"{cls.name}: argument {key}={value!r} {err}")
                        continue
            out[key] = value
        if problems:
            raise SpecError("; ".join(problems))
        return out

    @classmethod
    def check_site(cls, args: dict[str, Any], site: SiteInfo) -> str | None:
        """A problem with applying these args to this site (e.g. r too large), or None."""
        r = args.get("r")
        if isinstance(r, int) and r > min(site.d_in, site.d_out):
            return (
                f"{cls.name}: r={r} is larger than min(d_in, d_out)={min(site.d_in, site.d_out)} "
                f"of site {site.name!r} ({site.d_out}x{site.d_in})"
            )
        return None

    # -- the contract ------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW such that the merged weight is ``weight + ΔW`` (d_out × d_in, weight's dtype)."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        merged = weight + self.delta_weight(weight).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter at {self.site_name!r} produced non-finite weights")
        return merged

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of merged_weight (exact where ΔW does not depend on W)."""
        return merged - self.delta_weight(merged).to(merged.dtype)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for this adapter's trainable tensors."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}] if params else []

    def init_from_base(self, weight: torch.Tensor) -> None:
        """Called once when inserted, with the site's base weight (d_out × d_in); default: nothing."""

    def transform_grads(self, weight: torch.Tensor, ctx: StepContext) -> None:
        """Rewrite this adapter's ``.grad`` tensors before the optimizer step; default: nothing.

        A method that steps a tensor itself sets its ``.grad`` to None so the base optimizer skips it.
        """

    def after_step(self, weight: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Update rule after the optimizer step; return a new base weight (d_out × d_in) or None."""
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


_REGISTRY: dict[str, type[AdapterMethod]] = {}
SKIP = "skip"


def register_method(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    """Class decorator: make ``cls`` usable in specs under ``cls.name``."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"method class {cls.__name__} needs a `name` that is an identifier, got {cls.name!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[AdapterMethod]:
    """The registered class for ``name``; SpecError with a did-you-mean otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        options = sorted(_REGISTRY) + [SKIP]
        raise SpecError(f"unknown method {name!r}{suggest(name, options)}; valid: {', '.join(options)}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)
