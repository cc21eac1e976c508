"""Tensors tied under several names (an LM head sharing the input embedding) in state dicts.

``torch.nn.Module.state_dict`` lists a tied tensor once per name; safetensors (and so the HF
``Trainer``'s ``save_model`` of a non-``PreTrainedModel``) refuses such a dict. An lrc graph lists it
once, under its first name (what ``save_pretrained`` does), and fills the other names when loading.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn


def aliases(module: nn.Module) -> list[tuple[str, str]]:
    """``(alias, first_name)`` for every parameter or buffer reachable under more than one name."""
    first: dict[int, str] = {}
    out = []
    for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                   module.named_buffers(remove_duplicate=False)):
        if id(t) in first:
            out.append((name, first[id(t)]))
        else:
            first[id(t)] = name
    return out


def drop_aliases(module: nn.Module, state: dict[str, Any], prefix: str) -> None:
    """Remove every tied alias of ``module`` (keys under ``prefix``) from ``state``, keeping first names."""
    for alias, _ in aliases(module):
        state.pop(prefix + alias, None)


def fill_aliases(module: nn.Module, state: dict[str, Any], prefix: str) -> None:
    """Give every tied alias missing from ``state`` its first name's tensor (before loading)."""
    for alias, name in aliases(module):
        if prefix + alias not in state and prefix + name in state:
            state[prefix + alias] = state[prefix + name]
