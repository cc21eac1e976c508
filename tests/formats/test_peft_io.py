"""PEFT-format adapters: ours → peft.PeftModel, PEFT-trained → ours, both with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.common import example_ids, hidden, make_hf
from helpers.export import transformed

import lowrank_compiler as lrc
from lowrank_compiler.errors import ExportError, LoadError

TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "attn.c_proj"], "llama": ["q_proj", "v_proj"]}


def _out(model, ids, mask):
    with torch.no_grad():
        return hidden(model(ids, attention_mask=mask))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_ours_to_peft(kind, tmp_path):
    from peft import PeftModel

    gm, ids, mask = transformed(kind)
    lrc.export(gm, tmp_path / "ad", format="peft")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    pm = PeftModel.from_pretrained(make_hf(kind), str(tmp_path / "ad")).eval()
    ids2 = example_ids(3, 11, 4)
    mask2 = torch.ones_like(ids2)
    ref = _out(gm, ids2, mask2)
    torch.testing.assert_close(_out(pm, ids2, mask2), ref, atol=1e-5, rtol=0)
    assert (ref - _out(make_hf(kind), ids2, mask2)).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_peft_trained_to_ours(kind, tmp_path):
    from peft import LoraConfig, get_peft_model

    ids = example_ids(2, 8)
    mask = torch.ones_like(ids)
    torch.manual_seed(1)
    pm = get_peft_model(make_hf(kind), LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[kind],
                                                  rank_pattern={TARGETS[kind][0]: 2}, alpha_pattern={TARGETS[kind][0]: 3}))
    target = torch.randn(_out(pm, ids, mask).shape)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        loss = (hidden(pm(ids, attention_mask=mask)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    gm = lrc.load_peft(make_hf(kind), tmp_path / "peft", (ids,), {"attention_mask": mask})
    ranks = {s: a.r for s, a in lrc.adapters(gm).items()}
    assert sorted(set(ranks.values())) == [2, 4] and len(ranks) == 2 * len(TARGETS[kind])
    ids2 = example_ids(3, 11, 4)
    mask2 = torch.ones_like(ids2)
    ref = _out(pm, ids2, mask2)
    torch.testing.assert_close(_out(gm, ids2, mask2), ref, atol=1e-5, rtol=0)
    assert (ref - _out(make_hf(kind), ids2, mask2)).abs().max() > 1e-3
    # and back out again: ours → PEFT round trip keeps per-site ranks/alphas
    lrc.export(gm, tmp_path / "again", format="peft")
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) | {cfg["r"]} == {2, 4}


@pytest.mark.slow
def test_bad_peft_inputs(tmp_path):
    gm, ids, mask = transformed("bert")
    with pytest.raises(LoadError, match="no adapter_config.json"):
        lrc.load_peft(make_hf("bert"), tmp_path, (ids,), {"attention_mask": mask})
    lrc.export(gm, tmp_path / "ok", format="peft")
    with pytest.raises(LoadError, match="no linear site"):
        lrc.load_peft(make_hf("gpt2"), tmp_path / "ok", (ids,), {"attention_mask": mask})
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoadError, match="use_dora=True"):
        lrc.load_peft(make_hf("bert"), tmp_path / "ok", (ids,), {"attention_mask": mask})
    with pytest.raises(ExportError, match="drop --merge"):
        lrc.export(gm, tmp_path / "merged_peft", format="peft", merge=True)
    assert not (tmp_path / "merged_peft").exists()
