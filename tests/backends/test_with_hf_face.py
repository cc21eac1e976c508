"""backends/onnx/generate.with_hf_face: a face-less graph of an HF model gets ``lrc.load``'s face (formats/rebuild.py,
one rebuild for both), on a copy; tokens equal the stock model holding the merged weights (formula computed here)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.decoder import batch, make_decoder

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx.generate import with_hf_face


@pytest.mark.slow
def test_faceless_loaded_graph_gets_the_rebuilt_face(tmp_path):
    model = make_decoder("llama")
    ref = copy.deepcopy(model)
    gm = lrc.transform(model, "self_attn.q_proj:lora(r=4, alpha=8)", progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site, a in lrc.adapters(gm).items():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
            w = ref.get_submodule(site).weight
            w.add_(a.scaling * a.lora_B @ a.lora_A)
    lrc.save(gm, tmp_path / "m.lrc")
    bare = lrc.load(tmp_path / "m.lrc")
    bare.__dict__.pop("_lrc_face")  # as a graph that lost its face (an old file, a pass's fresh graph)
    faced = with_hf_face(bare)
    assert faced is not bare and faced.lrc_face is not None and bare.lrc_face is None
    assert with_hf_face(faced) is faced
    p = batch(seed=5)
    kw = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(faced.generate(**p, **kw), ref.eval().generate(**p, **kw))
