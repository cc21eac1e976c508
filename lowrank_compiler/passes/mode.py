"""Make dropout in a traced graph follow ``gm.train()`` / ``gm.eval()``."""

from __future__ import annotations

import torch
from torch import fx, nn

from lowrank_compiler.ir import TrainOnlySDPA, finalize, fresh_name, replace_with_module
from lowrank_compiler.passes.manager import PassResult

_aten = torch.ops.aten


def make_mode_switchable(gm: fx.GraphModule, sdpa_dropout: dict[str, float] | None = None) -> PassResult:
    """Rewrite baked-in dropout so the module's mode decides it.

    Cases:
      1. ``aten.dropout.default(x, p, train)`` → ``call_module(nn.Dropout(p))``.
      2. ``aten.scaled_dot_product_attention`` named in ``sdpa_dropout`` (node name → p > 0)
         → ``call_module(TrainOnlySDPA(p))`` (eval-mode traces lose the attention dropout p).
    Already-rewritten graphs have neither node kind left: ``modified=False``.
    """
    sdpa_dropout = sdpa_dropout or {}
    modified = False
    for node in list(gm.graph.nodes):
        modified |= _try_rewrite(gm, node, sdpa_dropout)
    if modified:
        finalize(gm)
    return PassResult(gm, modified)


def _try_rewrite(gm: fx.GraphModule, node: fx.Node, sdpa_dropout: dict[str, float]) -> bool:
    if node.op != "call_function":
        return False
    if node.target is _aten.dropout.default:  # case 1
        x, p = node.args[0], float(node.args[1])
        replace_with_module(gm, node, fresh_name(gm, "lrc_dropout"), nn.Dropout(p), (x,))
        return True
    if node.target is _aten.scaled_dot_product_attention.default and sdpa_dropout.get(node.name, 0) > 0:  # case 2
        replace_with_module(gm, node, fresh_name(gm, "lrc_sdpa"), TrainOnlySDPA(sdpa_dropout[node.name]),
                            node.args, dict(node.kwargs))
        return True
    return False
