"""Horizontal fusion of sibling LoRA sites (lowerings/fuse_siblings.py) against the unfused graph."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.common import example_ids, make_hf
from helpers.fuse import _setup

import lowrank_compiler as lrc
from lowrank_compiler import ir
from lowrank_compiler.lowerings.fuse_siblings import FusedLoRA, fuse_siblings, sibling_groups

GROUPS = {"bert": [3, 3], "llama": [3, 2, 3, 2]}  # q/k/v per layer; llama also gate/up


def _h(out):
    return out.last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_fused_graph_equals_unfused_forward_and_grads(kind):
    gm, ids, mask = _setup(kind)
    fused = fuse_siblings(gm)
    assert fused.modified and fused.gm is not gm
    mods = [m for m in fused.gm.modules() if isinstance(m, FusedLoRA)]
    assert [len(m.adapters) for m in mods] == GROUPS[kind]
    assert sum(n.op == "call_module" and isinstance(fused.gm.get_submodule(n.target), FusedLoRA)
               for n in fused.gm.graph.nodes) == len(GROUPS[kind])
    ir.verify(fused.gm)  # the IR invariants hold on the lowering (lower_memory and lrc.lower run on it)
    gm.eval()
    fused.gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_h(fused.gm(ids, attention_mask=mask)), _h(gm(ids, attention_mask=mask)),
                                   rtol=1e-5, atol=1e-5)
    grads = []
    for g in (gm, fused.gm):
        g.train()
        torch.manual_seed(3)  # same dropout masks: the fused graph keeps every dropout node in order
        _h(g(ids, attention_mask=mask)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad})
        gm.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_training_through_the_fused_graph_trains_gm():
    gm, ids, mask = _setup("bert")
    ref = copy.deepcopy(gm)
    fused = fuse_siblings(gm).gm
    curves = []
    for model, owner in ((ref, ref), (fused, gm)):
        opt = lrc.optimizer(owner, torch.optim.SGD, lr=0.5)  # linear in the grads: no Adam sign amplification
        model.eval()  # no dropout: compare the curves exactly
        losses = []
        target = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss = (_h(model(ids, attention_mask=mask)) - target).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        curves.append(losses)
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)
    assert curves[0][-1] < curves[0][0]
    for (n, a), b in zip(lrc.adapters(gm).items(), lrc.adapters(ref).values()):
        torch.testing.assert_close(a.lora_A, b.lora_A, rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(a.lora_B, b.lora_B, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_graph_follows_merge_and_bypass():
    """Shared modules: merging (a new base Parameter, adapters passthrough) is seen by the fused graph."""
    gm, ids, mask = _setup("bert")
    fused = fuse_siblings(gm).gm.eval()
    gm.eval()
    lrc.merge(gm, keep_adapters=True)
    with torch.no_grad():
        torch.testing.assert_close(_h(fused(ids, attention_mask=mask)), _h(gm(ids, attention_mask=mask)),
                                   rtol=1e-5, atol=1e-5)
    lrc.unmerge(gm)
    with torch.no_grad():
        torch.testing.assert_close(_h(fused(ids, attention_mask=mask)), _h(gm(ids, attention_mask=mask)),
                                   rtol=1e-5, atol=1e-5)


def test_only_plain_lora_without_dropout_is_fused():
    model = make_hf("bert")
    ids = example_ids(2, 8)
    gm = lrc.transform(model, "attention.self.query:dora(r=2); attention.self.key:lora(r=2, dropout=0.1); "
                       "attention.self.value:lora(r=2)", example_inputs=(ids,))
    assert sibling_groups(gm) == []
    res = fuse_siblings(gm)
    assert not res.modified and res.gm is gm
