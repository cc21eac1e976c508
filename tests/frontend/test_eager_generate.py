"""Issue 22: ``gm.generate`` runs the original modules eagerly with adapters swapped in; tokens equal the graph path."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank_compiler as lrc
from lowrank_compiler.frontend.eager import eager_ready
from tests.helpers.decoder import SPECS, batch, make_decoder

pytestmark = pytest.mark.slow  # 4 tests, 144 s at load 10 on 2 cores (each generate traces two graphs for the reference)


def _transformed(kind: str, spec: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = make_decoder(kind)
    gm = lrc.transform(model, spec or SPECS[kind][0])
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # adapters that change the tokens
    return model, gm


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_eager_generate_equals_graph_path_and_restores_the_model(kind):
    model, gm = _transformed(kind)
    b = batch(4, 12)
    before = {n: type(m) for n, m in model.named_modules()}
    assert eager_ready(gm, model)
    eager = gm.generate(**b, max_new_tokens=8, do_sample=False)
    graph = gm.generate(**b, max_new_tokens=8, do_sample=False, lrc_graphs=True)
    assert torch.equal(eager, graph)
    assert not torch.equal(eager, model.generate(**b, max_new_tokens=8, do_sample=False))  # adapters act
    assert {n: type(m) for n, m in model.named_modules()} == before  # the swap is undone


def test_eager_generate_sees_merged_weights():
    model, gm = _transformed("llama")
    b = batch(2, 10)
    want = gm.generate(**b, max_new_tokens=6, do_sample=False, lrc_graphs=True)
    merged = lrc.merge(gm)
    assert torch.equal(merged.generate(**b, max_new_tokens=6, do_sample=False), want)


def test_not_eager_when_a_tensor_is_not_shared():
    model, gm = _transformed("llama")
    other = copy.deepcopy(model)  # same structure, different tensor objects: the graph is not this model
    assert not eager_ready(gm, other)


def test_loaded_model_takes_the_eager_path(tmp_path):
    """A loaded Llama's face rebuilds RoPE's original_inv_freq from the config (the graph does not hold it): it
    still generates eagerly, with the tokens of the graph path and of the model before saving."""
    _, gm = _transformed("llama")
    b = batch(2, 10)
    want = gm.generate(**b, max_new_tokens=6, do_sample=False)
    lrc.save(gm, tmp_path / "m.lrc")
    loaded = lrc.load(tmp_path / "m.lrc")
    assert eager_ready(loaded, loaded.lrc_face.model)
    assert torch.equal(loaded.generate(**b, max_new_tokens=6, do_sample=False), want)
    assert torch.equal(loaded.generate(**b, max_new_tokens=6, do_sample=False, lrc_graphs=True), want)


def test_merged_model_generates_over_its_weights_eagerly():
    """lrc.merge's graph (no adapters left, its own copy of every weight) generates with the original modules
    reading the merged weights: tokens equal the merged graph path's and the unmerged model's; the original model
    keeps its own tensors afterwards."""
    from lowrank_compiler.frontend.eager import merged_tensors

    model, gm = _transformed("llama")
    b = batch(2, 10)
    want = gm.generate(**b, max_new_tokens=6, do_sample=False)
    before = {n: t for n, t in model.named_parameters()}
    merged = lrc.merge(gm)
    assert merged_tensors(merged, model) is not None and merged_tensors(gm, model) is None
    assert torch.equal(merged.generate(**b, max_new_tokens=6, do_sample=False), want)
    assert torch.equal(merged.generate(**b, max_new_tokens=6, do_sample=False, lrc_graphs=True), want)
    assert all(t is before[n] for n, t in model.named_parameters())  # restored
    assert not torch.equal(model.generate(**b, max_new_tokens=6, do_sample=False), want)  # base differs
