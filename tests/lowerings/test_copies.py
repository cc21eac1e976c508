"""Deep copies of lowered and compiled models keep their lowering for call signatures traced after the copy,
and own their parameters (reference: the original lowered/compiled model, and the unlowered graph)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.trainer import model_and_spec, probe

import lowrank_compiler as lrc
from lowrank_compiler.lowerings.kernels import LoweredLoRA


def _bert():
    """Tiny BERT classifier, LoRA on attention (random B, so the adapters change the output), a ``full`` head."""
    gm = lrc.transform(*model_and_spec("bert"), progress=False)
    with torch.no_grad():
        for ad in lrc.adapters(gm).values():
            ad.lora_B.normal_(std=0.3)
    return gm.eval()


def _lowered(mod: torch.nn.Module) -> bool:
    """Whether ``mod`` (a graph, or torch.compile's module around one) runs LoRA through the lowered kernel."""
    return any(isinstance(m, LoweredLoRA) for m in getattr(mod, "_orig_mod", mod).modules())


def _trainable(mod: torch.nn.Module) -> set[int]:
    """ids of every trainable tensor reachable from ``mod``, its face's parent graphs and their variants."""
    out, face = {id(p) for p in mod.parameters() if p.requires_grad}, mod.lrc_face
    while face is not None:
        out |= {id(p) for _, g in face.derived.values() for p in g.parameters() if p.requires_grad}
        if face.parent is None:
            break
        face, parent = face.parent
        out |= {id(p) for p in parent.parameters() if p.requires_grad}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lower", "compile"])
def test_deep_copy_lowers_new_signatures_and_owns_its_parameters(how):
    gm = _bert()
    made = lrc.lower(gm) if how == "lower" else lrc.compile(gm, backend="aot_eager")
    cp = copy.deepcopy(made)
    b, labels = probe(), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        want = made(**b, labels=labels)
        unlowered = gm(**b, labels=labels)
        got = cp(**b, labels=labels)  # a signature neither model had traced when the copy was made
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, unlowered.loss, rtol=1e-5, atol=1e-6)
    graphs = [g for _, g in cp.lrc_face.derived.values()]
    assert graphs and all(_lowered(g) for g in graphs)  # the copy's new signature runs a lowered graph
    if how == "compile":
        assert all(type(g).__name__ in ("OptimizedModule", "FlatCompiled") for g in graphs)
    assert not _trainable(cp) & (_trainable(made) | _trainable(gm))  # nothing trainable shared
    # training the copy (through the new signature) leaves the original alone
    opt = torch.optim.SGD([p for p in cp.parameters() if p.requires_grad], lr=1.0)
    cp.train()
    cp(**b, labels=labels).loss.backward()
    opt.step()
    cp.eval()
    with torch.no_grad():
        torch.testing.assert_close(made(**b, labels=labels).logits, want.logits, rtol=0, atol=0)
        assert (cp(**b, labels=labels).logits - want.logits).abs().max() > 1e-3
