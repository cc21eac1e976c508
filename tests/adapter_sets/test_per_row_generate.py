"""``gm.generate(..., adapter_names=[...])`` (PEFT's per-row adapters, "__base__" for none) against PEFT's tokens.

Two named LoRA sets with random non-zero B on tiny stock GPT-2 / Llama; the adapters reach PEFT through
``gm.save_pretrained`` (the active set in the directory, the other in ``<dir>/b``), so the same files serve both.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.decoder import SPECS, batch, make_decoder

import lowrank_compiler as lrc

peft = pytest.importorskip("peft")
ROWS = ["default", "b", "__base__", "b"]


def two_sets(kind: str):
    """(lrc model with sets "default" and "b", an untouched copy of the base)."""
    model = make_decoder(kind)
    base = copy.deepcopy(model)
    gm = lrc.transform(model, SPECS[kind][0])
    lrc.adapter_sets.add_adapter(gm, "b", SPECS[kind][0].replace("r=4, alpha=8", "r=2, alpha=6"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name in ("b", "default"):
            lrc.adapter_sets.set_adapter(gm, name)
            for mod in lrc.adapters(gm).values():
                mod.lora_B.normal_(0, 0.3)
    return gm.eval(), base


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_per_row_adapters_equals_peft(kind, tmp_path):
    gm, base = two_sets(kind)
    assert gm.save_pretrained(tmp_path / "ad") == {"default": "peft", "b": "peft"}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    pm.load_adapter(tmp_path / "ad" / "b", "b")
    pm.eval()
    b = batch(n=4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = pm.generate(**b, adapter_names=ROWS, **kw)
    got = gm.generate(**b, adapter_names=ROWS, **kw)
    assert torch.equal(got, want)
    singles = [gm.generate(**b, **kw)]  # the active set alone, then each row's set alone, agree per row
    lrc.adapter_sets.set_adapter(gm, "b")
    singles.append(gm.generate(**b, **kw))
    with lrc.adapter_sets.disable_adapters(gm):
        singles.append(gm.generate(**b, **kw))
    for i, name in enumerate(ROWS):
        ref = singles[{"default": 0, "b": 1, "__base__": 2}[name]]
        assert torch.equal(got[i], ref[i]), (i, name)
    assert not torch.equal(singles[0], singles[1])  # the sets differ, so routing is observable
    assert lrc.adapter_sets.adapter_names(gm) == ["b", "default"]
    after = gm.generate(**b, **kw)  # the routing is gone after the call
    assert torch.equal(after, singles[1])


def test_per_row_adapters_errors():
    gm, _ = two_sets("gpt2")
    b = batch(n=4)
    with pytest.raises(lrc.LrcError, match=r"unknown adapters \['zz'\]"):
        gm.generate(**b, adapter_names=["zz", "b", "b", "b"], max_new_tokens=1)
    with pytest.raises(lrc.LrcError, match="batch has 4 rows but adapter_names names 3"):
        gm.generate(**b, adapter_names=["b", "b", "b"], max_new_tokens=1)
    with pytest.raises(lrc.LrcError, match="list of adapter names"):
        gm.generate(**b, adapter_names="b", max_new_tokens=1)
