"""Lowering: the model's dropout (hidden and attention) → a cheaper keep mask.

Two node kinds (both made mode-switchable by ``passes/mode.py``):
  1. ``call_module(nn.Dropout(p))`` → ``call_module(kernels.FastDropout(p))``;
  2. ``call_module(TrainOnlySDPA(p))`` → ``call_module(kernels.FastAttention(p))``: in training with
     p > 0, attention written out with the same keep mask; otherwise plain SDPA.
The mask takes 31 random bits per element from ``random_`` (2.5× cheaper than ``bernoulli_`` on CPU,
and than inductor's per-element Philox): same distribution, another random stream, so a seeded run
drops other elements than the unlowered graph. Run on a copy that shares the parameters
(``backends/torch_compile.lower``); ``modified=False`` when there is no dropout.
"""

from __future__ import annotations

from torch import fx, nn

from lowrank_compiler.ir import TrainOnlySDPA, finalize, fresh_name
from lowrank_compiler.lowerings.kernels import FastAttention, FastDropout
from lowrank_compiler.passes.manager import PassResult


def _replacement(mod: nn.Module) -> nn.Module | None:
    if type(mod) is nn.Dropout:
        return FastDropout(mod.p)
    if type(mod) is TrainOnlySDPA and isinstance(getattr(mod, "p", None), float):
        return FastAttention(mod.p)
    return None


def lower_dropout(gm: fx.GraphModule) -> PassResult:
    """Every dropout / train-only SDPA module call → its lowered module (in place; new module objects)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        new = _replacement(gm.get_submodule(node.target))
        if new is None:
            continue
        new.train(gm.training)
        name = fresh_name(gm, "lrc_lowered_" + ("sdpa" if isinstance(new, FastAttention) else "dropout"))
        gm.add_module(name, new)
        node.target = name
        n += 1
    if n:
        finalize(gm)
    return PassResult(gm, bool(n))
