"""Generation without graphs: the original HF modules run eagerly, each adapted linear swapped for its adapter.

A decode step is a few hundred small ops; run as an aten-level fx graph each op pays Python dispatch
(``GraphModule`` codegen calls ``torch.ops.aten.*`` overload packets one by one, plus cache pytree flattening
per call), which cost a 1.1B decoder ~36% of its tokens/s. The original model's own forward is what HF
optimised for this loop, and it already shares every tensor with the transformed graph (``transform`` copies
nothing). So, while ``generate`` runs, each adapted ``nn.Linear`` / ``Conv1D`` of the original model is
replaced by an :class:`EagerSite` that calls the very adapter module the graph calls, with the graph's current
base weight (merged, LoRA-GA offset and Delta-LoRA weights included) and bias. The result is the graph's:
same adapter code on the same tensors, so greedy tokens are equal; the modules are restored afterwards.
Sites whose adapter has an exact merge run over W + ΔW folded once per ``generate`` call (:func:`_folds`, within
:func:`fold_budget`): the base model's step cost, with merge()'s rounding; nothing of the model is written.

Only when the graph is exactly "the original model + adapters" (:func:`eager_ready`): every call_module is an
adapter, a mode-switchable dropout or SDPA, every call_function an ATen op or ``operator`` builtin, and every
other tensor of the original model is the graph's own object. Anything else (lowered kernels, fully trained
module copies, a file loaded without its model) keeps the graph path.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _nn_module
from torch.nn.utils.stateless import _reparametrize_module

from lowrank_compiler.ir import AdapterMark, TrainOnlySDPA, adapter_sites, logical_weight, lookup_attr, lrc_meta
from lowrank_compiler.methods.base import AdapterMethod


class EagerSite(nn.Module):
    """``forward(x) = adapter(x, W, b)`` with the graph's current base weight and bias, or with ``folded``
    (W' = W + ΔW, computed once by :func:`eager_adapters`) ``linear(x, W', b)``."""

    def __init__(self, gm: fx.GraphModule, mark: AdapterMark, adapter: AdapterMethod,
                 folded: torch.Tensor | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.weight = logical_weight(gm, mark)
        self.bias = gm.get_parameter(mark.bias_path) if mark.bias_path else None
        self.folded = folded
        # no hook to run: call forward itself (``__call__``'s dispatch is per site and step; hooks added later
        # during this generate call are not seen)
        self.call = adapter.__call__ if _hooked(adapter) else adapter.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:
            return F.linear(x, self.folded, self.bias)
        return self.call(x, self.weight, self.bias)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs a forward (pre-)hook of its own or a global one."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _nn_module._global_forward_hooks
                or _nn_module._global_forward_pre_hooks)


#: default bound on the extra memory of generate's fold (MiB; ``LRC_GENERATE_FOLD_MB`` overrides, 0 turns it off)
FOLD_MB = 256


def fold_budget() -> int:
    """Bytes the folded weights of one ``generate`` call may take (``LRC_GENERATE_FOLD_MB``, default 256 MiB)."""
    try:
        return int(float(os.environ.get("LRC_GENERATE_FOLD_MB", FOLD_MB)) * (1 << 20))
    except ValueError:
        return FOLD_MB << 20


#: a fold costs about two passes over the folded weights plus fresh pages (20–50 ms for 44 MB at 512×4, 1 thread:
#: a few decode steps); a call asking for fewer new tokens than this does not pay it back, so it runs unfolded
FOLD_MIN_TOKENS = 32


def fold_default(model: nn.Module, args: tuple, kwargs: dict) -> bool | None:
    """``False`` (don't fold) for a ``generate`` call that will make fewer than :data:`FOLD_MIN_TOKENS` new
    tokens (``max_new_tokens``, or ``max_length`` minus the prompt, from the call or the generation config);
    None (the budgeted default) otherwise."""
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    n = kwargs.get("max_new_tokens", getattr(cfg, "max_new_tokens", None))
    if n is None:
        max_len = kwargs.get("max_length", getattr(cfg, "max_length", None)) or 20  # HF's model-agnostic default
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(max_len, int) and isinstance(ids, torch.Tensor):
            n = max_len - ids.shape[-1]
    return False if isinstance(n, int) and n < FOLD_MIN_TOKENS else None


def _plain_graph(gm: fx.GraphModule) -> bool:
    """Every call_module an adapter, dropout or SDPA; every call_function an ATen op or an ``operator`` builtin."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and not isinstance(gm.get_submodule(node.target),
                                                       (AdapterMethod, TrainOnlySDPA, nn.Dropout)):
            return False
        if node.op == "call_function" and not (isinstance(node.target, torch._ops.OpOverload)
                                               or getattr(node.target, "__module__", None) == operator.__name__
                                               or node.target is operator.getitem):
            return False
    return True


def eager_ready(gm: fx.GraphModule, model: nn.Module) -> bool:
    """Whether running ``model`` with :func:`eager_adapters` computes what ``gm``'s graph computes."""
    if not _plain_graph(gm):
        return False
    sites = adapter_sites(gm)
    if not sites:
        return False
    site_tensors = set()
    for _, mark, _ in sites:
        try:
            mod = model.get_submodule(mark.site)
        except AttributeError:
            return False
        if not hasattr(mod, "weight") or mark.layout == "conv1d" and type(mod).__name__ != "Conv1D":
            return False
        site_tensors |= {id(t) for t in mod.parameters(recurse=False)}
    own = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    # buffers a loaded model rebuilt from its config alone (RoPE's original_inv_freq ...; formats/rebuild.py):
    # the same values the traced model had, so the original modules may read them
    for name in lrc_meta(gm).get("config_buffers", ()):
        try:
            own.add(id(model.get_buffer(name)))
        except AttributeError:
            return False
    return all(id(t) in own or id(t) in site_tensors for t in [*model.parameters(), *model.buffers()])


@contextmanager
def eager_adapters(gm: fx.GraphModule, model: nn.Module, fold: bool | None = None) -> Iterator[nn.Module]:
    """``model`` with every adapted linear swapped for an :class:`EagerSite` (restored afterwards).

    ``fold`` (call under ``torch.no_grad``): each site whose adapter has an exact merge runs ``linear(x, W + ΔW, b)``
    over a copy folded once here, the base model's per-step cost; nothing of the model or the adapters is written.
    None: smallest weights first while the copies total at most :func:`fold_budget` (the fixed per-site cost it
    removes matters next to small weights; a large weight's product dwarfs it); True: every site; False: none."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    was = model.training
    sites = adapter_sites(gm)
    folded = _folds(gm, sites, fold_budget() if fold is None else (1 << 62 if fold else 0))
    try:
        for _, mark, adapter in sites:
            parent_path, _, leaf = mark.site.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            swapped.append((parent, leaf, getattr(parent, leaf)))
            setattr(parent, leaf, EagerSite(gm, mark, adapter, folded.get(mark.site)))
        model.train(gm.training)
        yield model
    finally:
        for parent, leaf, old in reversed(swapped):
            setattr(parent, leaf, old)
        model.train(was)


def _folds(gm: fx.GraphModule, sites: list, budget: int) -> dict[str, torch.Tensor]:
    """``{site: W + ΔW}`` for the sites whose adapter gives an inference weight and has no hooks (a hook must
    still see its calls), smallest weights first while the new copies total at most ``budget`` bytes."""
    out: dict[str, torch.Tensor] = {}
    if budget <= 0:
        return out
    for _, mark, adapter in sorted(sites, key=lambda s: logical_weight(gm, s[1]).numel()):
        w = logical_weight(gm, mark)
        size = w.numel() * w.element_size()
        if size > budget or _hooked(adapter):
            continue
        with torch.no_grad():
            folded = adapter.inference_weight(w)
        if folded is not None:
            out[mark.site] = folded
            budget -= 0 if folded is w else size
    return out


def merged_tensors(gm: fx.GraphModule, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """For a graph with no adapter left (``lrc.merge``: its own copy of every weight, W + ΔW where adapters were),
    ``{name: gm's tensor}`` for each of ``model``'s parameters and buffers, so the original modules can run over
    them (:func:`over_tensors`); None when ``gm`` is not the original model's computation tensor for tensor."""
    if adapter_sites(gm) or not _plain_graph(gm):
        return None
    out: dict[str, torch.Tensor] = {}
    twin: dict[int, torch.Tensor] = {}
    params = {id(p) for p in model.parameters()}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        mine = lookup_attr(gm, name)
        mine = mine if isinstance(mine, torch.Tensor) else twin.get(id(t))
        if mine is None:
            if id(t) in params:
                return None
            continue  # a buffer the graph does not hold (built from the config: RoPE tables ...): the model's own
        if mine.shape != t.shape or mine.dtype != t.dtype:
            return None
        twin.setdefault(id(t), mine)
        out[name] = mine
    return out


@contextmanager
def over_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` with its parameters and buffers read from ``tensors`` (by name) while inside; restored after."""
    with _reparametrize_module(model, tensors, tie_weights=True):
        yield model
