"""Sibling-LoRA setups shared by the fuse_siblings and lowering tests."""

from __future__ import annotations

import torch

import lowrank_compiler as lrc
from helpers.common import example_ids, make_hf

SPECS = {"bert": "attention.self.*:lora(r=4, alpha=8); attention.output.dense:lora(r=2)",
         "llama": "self_attn.*:lora(r=4, alpha=8); mlp.*:lora_plus(r=2)"}


def _setup(kind: str):
    model = make_hf(kind)
    ids = example_ids(4, 16)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    gm = lrc.transform(model, SPECS[kind], example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.3)
    return gm, ids, mask
