"""LoRA end to end on HF GPT-2 / BERT / Llama built from configs, against the unmodified model and PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.common import ATTN_SPEC, example_ids, hidden, make_hf

import lowrank_compiler as lrc
from lowrank_compiler.ir import adapter_nodes

KINDS = ["gpt2", "bert", "llama"]
PEFT_TARGETS = {"gpt2": ["attn.c_attn", "attn.c_proj"], "bert": ["query", "key", "value"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _randomize_b(gm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)


@pytest.fixture(params=KINDS)
def transformed(request):
    kind = request.param
    model = make_hf(kind)
    ids = example_ids()
    ref = hidden(model(ids)).detach()
    gm = lrc.transform(model, ATTN_SPEC[kind], example_inputs=(ids,))
    return kind, model, gm.eval(), ids, ref


def test_output_equals_base_at_init(transformed):
    kind, _, gm, ids, ref = transformed
    assert len(adapter_nodes(gm)) == {"gpt2": 4, "bert": 6, "llama": 8}[kind]
    assert (hidden(gm(ids)) - ref).abs().max().item() <= 1e-6
    other = example_ids(3, 11, seed=5)  # dynamic batch and sequence
    assert hidden(gm(other)).shape[:2] == (3, 11)


def test_gradients_reach_only_adapters(transformed):
    _, _, gm, ids, _ = transformed
    gm.train()
    hidden(gm(ids)).pow(2).mean().backward()
    with_grad = {n for n, p in gm.named_parameters() if p.grad is not None}
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert with_grad and with_grad == trainable
    assert all(".adapter.lora_" in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in gm.named_parameters() if n.endswith("lora_A") is False
               and p.grad is not None)  # B receives gradient at init (A's is 0 since B=0)


def test_optimizer_steps_lower_loss(transformed):
    _, _, gm, ids, ref = transformed
    target = ref + 0.5 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (hidden(gm(ids)) - target).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.97 * losses[0]


def test_merge_unmerge(transformed):
    _, model, gm, ids, _ = transformed
    _randomize_b(gm)
    y = hidden(gm(ids)).detach()
    merged = lrc.merge(gm)
    assert not any(".adapter" in n for n, _ in merged.named_modules())  # invariant: no adapter left
    assert (hidden(merged(ids)) - y).abs().max().item() <= 1e-5
    w0 = {n: p.detach().clone() for n, p in gm.named_parameters() if ".adapter." not in n}
    lrc.merge(gm, keep_adapters=True)
    assert (hidden(gm(ids)) - y).abs().max().item() <= 1e-5
    lrc.unmerge(gm)
    for n, p in gm.named_parameters():
        if ".adapter." not in n:
            assert (p - w0[n]).abs().max().item() <= 1e-6, n
    assert (hidden(gm(ids)) - y).abs().max().item() <= 1e-6
    # the user's model was not modified by merging
    assert (hidden(model(ids)) - hidden(lrc.merge(gm)(ids))).abs().max() > 1e-3


def test_save_load_round_trip(transformed, tmp_path):
    _, _, gm, ids, _ = transformed
    _randomize_b(gm)
    path = tmp_path / "model.pt"
    lrc.save(gm, path)
    gm2 = lrc.load(path).eval()
    other = example_ids(3, 13, seed=7)
    for x in (ids, other):
        assert torch.equal(hidden(gm2(x)), hidden(gm(x)))
    assert list(lrc.adapters(gm2)) == list(lrc.adapters(gm))
    assert sum(p.numel() for p in gm2.parameters() if p.requires_grad) == sum(
        p.numel() for p in gm.parameters() if p.requires_grad)


def test_matches_peft(transformed):
    peft = pytest.importorskip("peft")
    kind, _, gm, ids, _ = transformed
    _randomize_b(gm)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_A.mul_(3.0)
    base = make_hf(kind)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PEFT_TARGETS[kind],
                          fan_in_fan_out=(kind == "gpt2"))
    pm = peft.get_peft_model(base, cfg).eval()
    sd = {}
    for site, a in lrc.adapters(gm).items():
        sd[f"base_model.model.{site}.lora_A.default.weight"] = a.lora_A.detach()
        sd[f"base_model.model.{site}.lora_B.default.weight"] = a.lora_B.detach()
    missing = [k for k in sd if k not in pm.state_dict()]
    assert not missing
    pm.load_state_dict(sd, strict=False)
    assert (hidden(pm(ids)) - hidden(gm(ids))).abs().max().item() <= 1e-5


def test_transform_does_not_copy_parameters():
    model = make_hf("bert")
    gm = lrc.transform(model, ATTN_SPEC["bert"], example_inputs=(example_ids(),))
    q = model.encoder.layer[0].attention.self.query.weight
    assert gm.get_parameter("encoder.layer.0.attention.self.query.weight") is q
    assert copy.deepcopy(gm) is not gm
