"""The AdapterMethod contract and the method registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from lowrank_compiler.errors import MergeError, SpecError
from lowrank_compiler.methods.args import Arg, _number_range, suggest


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


class LowRank(NamedTuple):
    """An adapter's low-rank form: its output adds ``scale · B A x`` (A: r × d_in, B: d_out × r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


class MixedFactors(NamedTuple):
    """An additive adapter in the form a mixed-adapter batch stacks (``passes/mixed.py``), differentiable:
    ``y = g ⊙ (W x' + B A x') + b`` with ``x' = dropout_p(x)`` (DoRA's exact dropout form when ``g`` is
    set: ``W x + (g − 1) ⊙ W x' + g ⊙ B A x'``). ``A`` r × d_in, ``B`` d_out × r with the scale folded in,
    ``gain`` (d_out) or None for 1."""

    A: torch.Tensor
    B: torch.Tensor
    gain: torch.Tensor | None
    dropout: float


class AdapterMethod(nn.Module):
    """An adapter that replaces one linear ``y = x Wᵀ + b``.

    Contract (DESIGN.md): it owns its trainable state, never the frozen base weight, which the graph
    passes in. A subclass sets ``name`` and ``args`` and implements ``forward(x, weight, bias)`` and
    ``delta_weight(weight)``; everything else has a working default:
    - ``config``: the resolved spec arguments (every arg, defaults filled in), stored once here;
      subclasses read it and never rewrite it.
    - ``merged``: the base weight holds ``merged_weight(W)``; ``bypass``: run as the plain linear
      (both make ``passthrough`` true, which ``forward`` must honour).
    - ``low_rank_factors() -> LowRank | None``: ``(A, B, s)`` with forward = linear(x, W, b) + s·B A x
      in eval mode relative to the *current* base weight, or None (DoRA). ONNX separate export,
      PEFT export and the original-base rebase all use it.
    - ``base_offset() -> LowRank | None``: when the method changed the base by a known low-rank
      offset (LoRA-GA: W = W0 − s·B0 A0), that offset; ``modifies_base`` methods without one
      (Delta-LoRA, LoRASC) cannot be re-expressed against the original base.
    - ``param_groups(lr)``, ``init_from_base(weight)``, ``transform_grads(weight, ctx)``,
      ``after_step(weight, ctx) -> new base | None``, ``loss_terms()`` (training pass hooks).
    - Data-dependent initialization: mix in :class:`DataDependentInit`.
    """

    name: ClassVar[str] = ""
    args: ClassVar[dict[str, Arg]] = {}
    #: True when after_step / initialize may change the base weight.
    modifies_base: ClassVar[bool] = False
    #: fp32 parameters (and optimizer state) on a bf16 / fp16 base, as PEFT's ``autocast_adapter_dtype``
    fp32_master: ClassVar[bool] = False

    @classmethod
    def param_dtype(cls, site: SiteInfo) -> torch.dtype:
        """The dtype of this method's parameters at ``site``: float32 for an ``fp32_master`` method on a
        bf16 / fp16 base, else the base weight's dtype."""
        return torch.float32 if cls.fp32_master and site.dtype in (torch.bfloat16, torch.float16) else site.dtype

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__()
        self.site_name = site.name
        self.d_in = site.d_in
        self.d_out = site.d_out
        self.config: dict[str, Any] = dict(kwargs)
        self.merged = False
        self.bypass = False
        #: named adapter sets (adapter_sets/named.py): which parameters trained before the set was frozen
        self.saved_trainable: dict[str, bool] | None = None
        #: held by a trainable mixed-batch graph (adapter_sets/mixed.py): switching sets does not freeze it
        self.mixed_trainable = False

    @property
    def passthrough(self) -> bool:
        """True when forward must compute only ``linear(x, weight, bias)`` (merged or bypassed)."""
        return self.merged or self.bypass

    @property
    def data_dependent(self) -> bool:
        """Whether this adapter needs ``passes.initialize`` (see :class:`DataDependentInit`)."""
        return isinstance(self, DataDependentInit)

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
            if spec.required and given.get(key) is None:
                problems.append(f"{cls.name}: argument {key} is required ({spec.doc}), e.g. {cls.name}({key}=...)")
                continue
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
                err = _number_range(value)
                if err:
                    problems.append(f"{cls.name}: argument {key}={value!r} {err}")
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
        """``weight + ΔW``; raises :class:`MergeError` when the result is not finite."""
        return check_finite(weight + self.delta_weight(weight).to(weight.dtype), self.site_name)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of merged_weight (exact where ΔW does not depend on W)."""
        return merged - self.delta_weight(merged).to(merged.dtype)

    def low_rank_factors(self) -> LowRank | None:
        """``(A, B, s)`` such that this adapter adds ``s·B A x`` to the current base linear, or None."""
        return None

    def inference_weight(self, weight: torch.Tensor) -> torch.Tensor | None:
        """A new W' with ``forward(x, weight, b) = linear(x, W', b)`` in the current mode up to merge rounding
        (``weight`` itself when passthrough), for a no-grad ``generate`` (frontend/eager.py); None: opt-in only."""
        return None

    def mixed_factors(self, weight: torch.Tensor) -> MixedFactors | None:
        """This adapter as :class:`MixedFactors` (gradients flow to its parameters), or None when it is not
        additive-low-rank-with-gain (then it cannot share a mixed-adapter batch)."""
        return None

    #: True for methods that hold several adapters themselves and pick one per row (FLoRA): they
    #: implement ``forward_rows(x, weight, bias, adapter_ids)`` and ``n_slots``.
    batched: ClassVar[bool] = False

    def base_offset(self) -> LowRank | None:
        """The low-rank offset this method applied to the base (W_now = W_original − s·B0 A0), or None."""
        return None

    def original_base_factors(self) -> LowRank | None:
        """``(A', B', s)`` with W_original + s·B'A' = the adapted weight, or None when not expressible.

        Plain low-rank methods give their own factors; a known base offset is folded in as rank 2r
        ([A; A0], [B, −B0]); a base changed in an unknown way (Delta-LoRA, LoRASC) gives None.
        """
        f = self.low_rank_factors()
        if f is None:
            return None
        off = self.base_offset()
        if off is None:
            return None if self.modifies_base else f
        if off.scale != f.scale:
            return None
        return LowRank(torch.cat([f.A.detach(), off.A.to(f.A.dtype)], 0),
                       torch.cat([f.B.detach(), -off.B.to(f.B.dtype)], 1), f.scale)

    def loss_terms(self) -> torch.Tensor | None:
        """A regulariser the training pass adds to the loss (AdaLoRA's orthogonality), or None."""
        return None

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

    @classmethod
    def before_step_all(cls, adapters: list[AdapterMethod], ctx: StepContext) -> None:
        """Called once per optimizer step for each method class present, with all of its adapters in
        graph order, after the per-site ``transform_grads`` and before the base step (a view across
        sites, e.g. a regulariser normalized over all sites); default: nothing."""

    @classmethod
    def after_step_all(cls, adapters: list[AdapterMethod], ctx: StepContext) -> None:
        """Like :meth:`before_step_all`, after the per-site ``after_step`` (global rank budgets); default: nothing."""

    @classmethod
    def tie(cls, adapters: list[AdapterMethod]) -> None:
        """Re-establish tensors shared across sites (by identity) from the adapters' buffers; called with
        every adapter of this class in a graph after its tensors are loaded; default: nothing."""

    def final_rank(self) -> int | None:
        """The rank this adapter has now (after masking/pruning), or None when it has no rank notion."""
        f = self.low_rank_factors()
        return None if f is None else int(f.A.shape[0])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class DataDependentInit:
    """Mixin for methods initialized from data by ``passes.initialize`` (LoRA-GA, LoRA-drop, ...).

    The pass feeds ``init_stats(device)`` (a :class:`~lowrank_compiler.methods.gradstats.GradStats`
    accumulator) with the site input x and output gradient ∂L/∂y of each batch, then calls
    ``initialize(stats, weight) -> new base weight | None``. The subclass registers a bool buffer
    ``initialized`` (saved with the adapter, so loading never re-runs the init).
    ``identity_before_init``: the adapter is the identity until initialized, so the pass bypasses
    it (plain linear) while estimating.
    """

    identity_before_init: ClassVar[bool] = False
    initialized: torch.Tensor

    def init_stats(self, device: torch.device | None = None) -> Any:
        raise NotImplementedError

    def initialize(self, stats: Any, weight: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    @property
    def needs_init(self) -> bool:
        return not bool(self.initialized)

    @classmethod
    def initialize_all(cls, adapters: list[Any]) -> None:
        """Called by ``passes.initialize`` once per method class, after every site's ``initialize``,
        with the adapters of this class it just initialized (graph order): decisions across sites
        (LoRA-drop's kept set); default: nothing."""


def check_finite(weight: torch.Tensor, site: str) -> torch.Tensor:
    """``weight`` if every entry is finite, else :class:`MergeError` naming the site."""
    if not torch.isfinite(weight).all():
        raise MergeError(f"merging the adapter at {site!r} produced non-finite weights (NaN/inf in its "
                         "tensors or an overflow in the base dtype); the base weight was not changed")
    return weight


def by_method_class(adapters: list[Any]) -> dict[type, list[Any]]:
    """``{method class: its adapters in the given order}``, classes in order of first appearance."""
    out: dict[type, list[Any]] = {}
    for ad in adapters:
        out.setdefault(type(ad), []).append(ad)
    return out


_REGISTRY: dict[str, type[AdapterMethod]] = {}
SKIP = "skip"
FULL = "full"  # not an adapter: the matched module is trained as a whole (PEFT's modules_to_save)


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
        options = sorted(_REGISTRY) + [SKIP, FULL]
        raise SpecError(f"unknown method {name!r}{suggest(name, options)}; valid: {', '.join(options)}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)
