"""``lrc.adapter_sets.mixed_batch`` results have the model's face: every call signature (labels, decode steps) and
``generate`` with per-row adapters. Reference: the stock Llama holding each set's merged weights (formula computed
here), one whole batch per set, row i taken from its set's run."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.decoder import batch, make_decoder

import lowrank_compiler as lrc
from lowrank_compiler.adapter_sets.named import named_adapter_modules

SPEC = "self_attn.q_proj:lora(r=4, alpha=8); self_attn.v_proj:lora(r=4, alpha=8)"
ROWS = ["b", "default", "__base__", "b"]


def _setup():
    model = make_decoder("llama")
    base = copy.deepcopy(model).eval()
    gm = lrc.transform(model, SPEC, progress=False)
    lrc.adapter_sets.add_adapter(gm, "b", SPEC.replace("r=4, alpha=8", "r=2, alpha=6"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("b", "default"):
            for m in named_adapter_modules(gm, name).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    refs = {"__base__": base}
    for name in ("default", "b"):
        ref = copy.deepcopy(base)
        with torch.no_grad():
            for site, m in named_adapter_modules(gm, name).items():
                ref.get_submodule(site).weight.add_(m.scaling * m.lora_B @ m.lora_A)
        refs[name] = ref
    return gm.eval(), refs


def _rows(refs, fn):
    return torch.stack([fn(refs[name])[i] for i, name in enumerate(ROWS)])


@pytest.mark.slow
def test_mixed_batch_has_every_call_and_generate():
    gm, refs = _setup()
    mgm = lrc.adapter_sets.mixed_batch(gm, ["default", "b"]).eval()
    ids = lrc.adapter_sets.adapter_ids(mgm, ROWS)
    p = batch(seed=4)
    labels = p["input_ids"].masked_fill(p["attention_mask"] == 0, -100)
    with torch.no_grad():
        want = _rows(refs, lambda m: m(**p).logits)
        traced = mgm(**p, adapter_ids=ids)  # the traced call: the mixed graph itself
        torch.testing.assert_close(traced.logits if hasattr(traced, "logits") else traced[0], want,
                                   atol=2e-5, rtol=1e-4)
        out = mgm(**p, labels=labels, adapter_ids=ids)  # another signature: the model's face, rows routed
        torch.testing.assert_close(out.logits, want, atol=2e-5, rtol=1e-4)
        assert torch.isfinite(out.loss)
    assert mgm.config.to_dict() == gm.config.to_dict()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want_tokens = _rows(refs, lambda m: m.generate(**p, **kw))
    assert torch.equal(mgm.generate(**p, adapter_ids=ids, **kw), want_tokens)
    assert torch.equal(mgm.generate(**p, adapter_names=ROWS, **kw), want_tokens)
    with pytest.raises(lrc.LrcError, match="adapter_ids="):
        mgm(**p, labels=labels)
    with pytest.raises(lrc.LrcError, match="unknown adapter names"):
        mgm.generate(**p, adapter_names=["zz"] * 4, **kw)
    mgm(**p, labels=labels, adapter_ids=ids).loss.backward()  # training through a routed signature
    for name in ("default", "b"):
        assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0
                   for m in named_adapter_modules(gm, name).values()), name
    with torch.no_grad():  # the routing is gone: the source model runs its active set again
        torch.testing.assert_close(gm(**p).logits, refs["default"](**p).logits, atol=2e-5, rtol=1e-4)
