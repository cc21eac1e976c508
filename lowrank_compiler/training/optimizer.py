"""Train plan: a real torch.optim.Optimizer whose step runs each adapter's update rules."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import fx

from lowrank_compiler.errors import LrcError, MergeError
from lowrank_compiler.ir import META_KEY, AdapterMark, adapter_nodes, logical_weight, set_logical_weight
from lowrank_compiler.methods.base import AdapterMethod, StepContext, by_method_class

_CLASSES: dict[type, type] = {}


class LrcOptimizerMixin:
    """Mixed into the user's optimizer class (``LrcAdamW`` is-a ``torch.optim.AdamW``).

    ``step()`` runs, in order: every adapter's ``transform_grads`` (LoRA-Pro, LoRA-FA), each method
    class's ``before_step_all`` over all its adapters (AdaLoRA's regulariser gradient), the base
    optimizer's own step over the method-specific param groups (LoRA+ ratios), every adapter's
    ``after_step`` (Delta-LoRA, LoRASC), writing any new base weight it returns, then each class's
    ``after_step_all`` (AdaLoRA's global rank budget, ALoRA's pruning rounds). ``param_groups`` and
    ``state`` are the base optimizer's, so LR schedulers, ``clip_grad_norm_``, GradScaler and
    ``state_dict()``/``load_state_dict()`` work unchanged; the lrc step counter is saved in the
    state dict under ``"lrc"``.
    """

    _lrc_gm: fx.GraphModule
    _lrc_sites: list[tuple[AdapterMark, AdapterMethod]]
    _lrc_step: int
    _lrc_owned: dict[str, weakref.ref]

    def _lrc_bind(self, gm: fx.GraphModule, sites: list[tuple[AdapterMark, AdapterMethod]]) -> None:
        self._lrc_gm, self._lrc_sites, self._lrc_step = gm, sites, 0
        self._lrc_owned = {}  # weight path -> ref to the Parameter this optimizer created (safe to write in place)
        self._lrc_group_of: dict[int, dict[str, Any]] = {}

    @property
    def lrc_step(self) -> int:
        """Number of optimizer steps taken (restored by ``load_state_dict``)."""
        return self._lrc_step

    def _group(self, p: torch.Tensor) -> dict[str, Any]:
        g = self._lrc_group_of.get(id(p))
        if g is None or not any(q is p for q in g["params"]):
            self._lrc_group_of = {id(q): grp for grp in self.param_groups for q in grp["params"]}  # type: ignore[attr-defined]
            g = self._lrc_group_of[id(p)]
        return g

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        merged = [m.site for m, a in self._lrc_sites if a.merged]
        if merged:
            raise LrcError(f"adapters {merged[:3]} are merged; call lrc.unmerge(gm) before training")
        self._lrc_step += 1
        ctx = StepContext(self._lrc_step, lambda p: self.state[p], self._group)  # type: ignore[attr-defined]
        gm = self._lrc_gm
        by_class = by_method_class([ad for _, ad in self._lrc_sites])
        for mark, ad in self._lrc_sites:
            ad.transform_grads(logical_weight(gm, mark), ctx)
        for cls, ads in by_class.items():
            cls.before_step_all(ads, ctx)
        _base_step(self)
        updates = []
        for mark, ad in self._lrc_sites:
            new = ad.after_step(logical_weight(gm, mark), ctx)
            if new is not None:
                updates.append((mark, new))
        for mark, new in updates:  # check all before writing any: a refused step changes no base weight
            _check_finite_base(mark, new, self._lrc_step)
        for mark, new in updates:
            self._write_base(mark, new)
        for cls, ads in by_class.items():
            cls.after_step_all(ads, ctx)
        return loss

    def _write_base(self, mark: AdapterMark, value: torch.Tensor) -> None:
        """Write a new base weight: in place when this optimizer created the Parameter, else a new one
        (the original may be shared with the user's model, see ``passes.merge.set_logical_weight``).

        A non-finite value is refused (:class:`MergeError` naming the site and method; the base weight
        keeps its old value). lrc refuses rather than skips: a skipped update would silently
        desynchronise methods that track the base (Delta-LoRA's previous B·A, LoRASC's cascade).
        Under ``torch.cuda.amp.GradScaler`` an inf/NaN gradient step never reaches here, since the
        scaler skips ``optimizer.step()`` itself.
        """
        _check_finite_base(mark, value, self._lrc_step)
        gm = self._lrc_gm
        ref = self._lrc_owned.get(mark.weight_path)
        if ref is not None and ref() is gm.get_parameter(mark.weight_path):
            logical_weight(gm, mark).copy_(value)
        else:
            set_logical_weight(gm, mark, value)
            self._lrc_owned[mark.weight_path] = weakref.ref(gm.get_parameter(mark.weight_path))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        sd["lrc"] = {"step": self._lrc_step}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        lrc = sd.pop("lrc", None) or {}
        super().load_state_dict(sd)  # type: ignore[misc]
        self._lrc_step = int(lrc.get("step", 0))
        self._lrc_group_of = {}


def _check_finite_base(mark: AdapterMark, value: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise MergeError(f"step {step}: the {mark.method!r} update of site {mark.site!r} would write NaN/inf into its "
                         "base weight (non-finite loss or gradients, or a too-large learning rate); the base "
                         "weights were not changed; check the batch and the learning rate")


def _base_step(opt: Any) -> None:
    """The base class's step, without its second profile/step-hook wrapper (ours already ran them)."""
    mro = type(opt).__mro__
    base = next(c for c in mro[mro.index(LrcOptimizerMixin) + 1:] if "step" in c.__dict__)
    fn = base.__dict__["step"]
    (fn.__wrapped__ if getattr(fn, "hooked", False) else fn)(opt)


def _lrc_class(opt_cls: type[torch.optim.Optimizer]) -> type:
    if issubclass(opt_cls, LrcOptimizerMixin):
        return opt_cls
    if opt_cls not in _CLASSES:
        _CLASSES[opt_cls] = type(f"Lrc{opt_cls.__name__}", (LrcOptimizerMixin, opt_cls), {"__module__": __name__})
    return _CLASSES[opt_cls]


def _same_hparams(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}


def optimizer(
    gm: fx.GraphModule,
    opt_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-3,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An ``opt_cls`` instance over ``gm``'s adapters that runs the methods' update rules in ``step()``.

    Param groups come from each adapter's ``param_groups(lr)`` (groups with equal hyperparameters
    are fused, in graph order, so the order is stable across save/load); any other trainable
    parameter of ``gm`` (e.g. an unfrozen head) gets one extra group at ``lr``. ``kwargs`` go to
    ``opt_cls`` (``weight_decay=``, ``betas=`` ...). Mixed specs work in one optimizer.

    Raises:
        LrcError: ``gm`` is not a transformed model, or has no adapters and nothing else to train.
    """
    if not isinstance(gm, fx.GraphModule):
        raise LrcError(f"lrc.optimizer needs a transformed model, got a {type(gm).__name__}; call "
                       "gm = lrc.transform(model, spec) first and pass gm")
    sites: list[tuple[AdapterMark, AdapterMethod]] = []
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for node in adapter_nodes(gm):
        mark: AdapterMark = node.meta[META_KEY]
        ad: AdapterMethod = gm.get_submodule(mark.module_path)
        sites.append((mark, ad))
        for g in ad.param_groups(lr):
            params = [p for p in g["params"] if id(p) not in seen]
            seen.update(id(p) for p in params)
            if not params:
                continue
            for old in groups:
                if _same_hparams(old, g):
                    old["params"].extend(params)
                    break
            else:
                groups.append({**g, "params": list(params)})
    rest = [p for p in gm.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": lr})
    if not groups:
        raise LrcError("nothing to train: the graph has no adapters and no trainable parameters; "
                       "call lrc.transform(model, spec, ...) first")
    opt = _lrc_class(opt_cls)(groups, lr=lr, **kwargs)
    opt._lrc_bind(gm, sites)
    return opt


def trainer_optimizers(
    gm: fx.GraphModule, opt_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, lr: float = 5e-5, **kwargs: Any
) -> tuple[torch.optim.Optimizer, None]:
    """``(optimizer, None)`` for ``transformers.Trainer(optimizers=...)``: the Trainer builds its LR
    scheduler over this optimizer, and its ``step()`` applies the methods' update rules."""
    return optimizer(gm, opt_cls, lr=lr, **kwargs), None
