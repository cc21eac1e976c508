"""A LoRA-GA default adapter plus a named ``lora`` set: ``generate`` must not depend on which set was active when
a call signature was first traced (last session's bug: the variant graph re-inserted the primary's *method* with the
active module's arguments, replacing the shared ``lora`` modules by fresh LoRA-GA ones, or failing).

Reference: the unmodified HF Llama with each set's effective weight written into it by a formula computed here,
W_eff = W − s·B0·A0 (LoRA-GA's offset, from its ``init_*`` buffers) + s_set·B_set·A_set.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.decoder import batch, make_decoder

import lowrank_compiler as lrc
from lowrank_compiler.adapter_sets.named import named_adapter_modules
from lowrank_compiler.ir import adapter_sites

NEW = 4


def _data() -> list[dict[str, torch.Tensor]]:
    out = []
    for s in (0, 1):
        b = batch(seed=s)
        out.append({**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)})
    return out


def _model():
    """(LoRA-GA default + named 'lora', both with non-zero trained-looking factors; untouched base copy)."""
    model = make_decoder("llama")
    base = copy.deepcopy(model)
    gm = lrc.transform(model, "self_attn.*:loraga(r=4)", data=_data(), loss_fn=lambda o, b: o.loss, progress=False)
    lrc.adapter_sets.add_adapter(gm, "lora", "self_attn.*:lora(r=4, alpha=8)")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("lora", "default"):
            lrc.adapter_sets.set_adapter(gm, name)
            for m in lrc.adapters(gm).values():
                m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return gm.eval(), base


def _reference(gm, base, name: str):
    """The stock model holding ``name``'s effective weights (computed here, not by lrc)."""
    offsets = {s: m.scaling * (m.init_B @ m.init_A) for s, m in
               named_adapter_modules(gm, "default").items()}
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for site, m in named_adapter_modules(gm, name).items():
            w = ref.get_submodule(site).weight
            w.copy_(w - offsets[site] + m.scaling * (m.lora_B @ m.lora_A))
    return ref.eval()


@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("order", [("lora", "default"), ("default", "lora")], ids=["lora-first", "default-first"])
def test_generate_does_not_depend_on_call_history(order, graphs):
    gm, base = _model()
    p = batch(seed=9)
    kw = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    seen = {}
    for name in order:
        lrc.adapter_sets.set_adapter(gm, name)
        want = _reference(gm, base, name).generate(**p, **kw)
        got = gm.generate(**p, **kw, lrc_graphs=graphs)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-4,
                                   msg=f"{name} after {order}")
        assert torch.equal(got.sequences, want.sequences), name
        with torch.no_grad():
            torch.testing.assert_close(gm(**p).logits, _reference(gm, base, name)(**p).logits, atol=2e-5, rtol=1e-4)
        seen[name] = torch.stack(got.logits)
    assert (seen["lora"] - seen["default"]).abs().max() > 1e-2  # the sets differ: switching is observable
    graphs = [gm, *(e.gm for es in gm.lrc_face.variants.values() for e in es)]
    active = "lora" if order[-1] == "lora" else "loraga"  # every graph's marks name the method that runs
    assert {(m.method, mod.name) for g in graphs for _, m, mod in adapter_sites(g)} == {(active, active)}
    kinds = {n: {type(m).__name__ for m in named_adapter_modules(gm, n).values()} for n in order}
    assert kinds == {"lora": {"LoRA"}, "default": {"LoRAGA"}}  # no set's modules were replaced by another's


@pytest.mark.slow
def test_mixed_batch_generate_with_a_loraga_offset():
    """The mixed graph's face over the same two sets: row i on slot ids[i], −1 = the original base (offset undone)."""
    gm, base = _model()
    mgm = lrc.adapter_sets.mixed_batch(gm, ["default", "lora"]).eval()
    ids = torch.tensor([0, 1, -1, 1])
    refs = [_reference(gm, base, "default"), _reference(gm, base, "lora"), base.eval()]
    p = batch(seed=9)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    want = torch.stack([refs[int(k)].generate(**p, **kw)[i] for i, k in enumerate(ids)])
    assert torch.equal(mgm.generate(**p, adapter_ids=ids, **kw), want)
    labels = p["input_ids"].masked_fill(p["attention_mask"] == 0, -100)
    with torch.no_grad():
        got = mgm(**p, labels=labels, adapter_ids=ids).logits
        ref = torch.stack([refs[int(k)](**p).logits[i] for i, k in enumerate(ids)])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
