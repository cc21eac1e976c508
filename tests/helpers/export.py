"""Helpers shared by the export tests: transformed tiny HF models with trained-looking adapters."""

from __future__ import annotations

import torch

import lowrank_compiler as lrc
from helpers.common import ATTN_SPEC, example_ids, hidden, make_hf


def transformed(kind: str, seed: int = 1, spec: str | None = None):
    """(gm, ids, mask) for a tiny HF model with LoRA on attention and random (non-zero) B."""
    ids = example_ids(2, 8)
    mask = torch.ones_like(ids)
    gm = lrc.transform(make_hf(kind), spec or ATTN_SPEC[kind], (ids,), {"attention_mask": mask})
    randomize(gm, seed)
    return gm, ids, mask


def randomize(gm, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * std)


def train_steps(gm, ids, mask, seed: int, steps: int = 3) -> None:
    """A few SGD steps towards a random target (different seeds = adapters trained on different data)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(hidden(gm(ids, attention_mask=mask)).shape, generator=g)
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    gm.train()
    for _ in range(steps):
        loss = (hidden(gm(ids, attention_mask=mask)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()


def torch_out(gm, ids, mask):
    with torch.no_grad():
        return hidden(gm(ids, attention_mask=mask)).numpy()


def base_out(gm, ids, mask):
    from lowrank_compiler.passes.strip import strip

    return torch_out(strip(gm).gm.eval(), ids, mask)


def shapes():
    """Two input shapes other than the traced one (dynamic batch and sequence)."""
    out = []
    for b, s, seed in ((3, 13, 5), (1, 5, 6)):
        ids = example_ids(b, s, seed)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        out.append((ids, mask))
    return out
