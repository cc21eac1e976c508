"""PEFT-format adapters: ours → peft.PeftModel, PEFT-trained → ours, both with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.common import example_ids, hidden, make_hf
from helpers.decoder import SPECS, batch, make_decoder
from helpers.export import transformed
from helpers.mlp import MLP, inputs, make_mlp

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
    with pytest.raises(LoadError, match="missing lora_magnitude_vector"):
        lrc.load_peft(make_hf("bert"), tmp_path / "ok", (ids,), {"attention_mask": mask})
    with pytest.raises(ExportError, match="drop --merge"):
        lrc.export(gm, tmp_path / "merged_peft", format="peft", merge=True)
    assert not (tmp_path / "merged_peft").exists()


# -- every method PEFT holds: PEFT's own directories → lrc.load_peft, and lrc's export → PeftModel ------------

def peft_configs(targets: list[str]) -> dict:
    import peft

    return {
        "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True),
        "vera": peft.VeraConfig(r=8, target_modules=targets, d_initial=0.1),
        "adalora": peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6,
                                      lora_alpha=8, target_modules=targets),
        "rslora_heads": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[:1], use_rslora=True,
                                        modules_to_save=["fc3"] if targets[0] == "fc1" else ["lm_head"]),
    }


LRC_CLASS = {"dora": "DoRA", "vera": "VeRA", "adalora": "AdaLoRA", "rslora_heads": "LoRA"}


def peft_built(kind: str, model, targets: list[str], step_batch):
    """A real PEFT model of ``kind`` moved away from its init: 6 SGD steps (AdaLoRA: its own loop with
    update_and_allocate from step 0, so the saved directory carries a rank_pattern), else random noise."""
    import peft

    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft_configs(targets)[kind])
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    if kind == "adalora":
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
        for step in range(6):
            step_batch(pm).backward()
            opt.step()
            pm.base_model.update_and_allocate(step)
            opt.zero_grad()
        assert pm.peft_config["default"].rank_pattern
    return pm.eval()


class LossMLP(MLP):
    """make_mlp()'s model (same names and weights) returning an object with .loss when given targets
    (PEFT's AdaLoRA adds its regulariser to it)."""

    def forward(self, x, t=None):
        y = super().forward(x)
        return y if t is None else type("Out", (), {"loss": (y - t).pow(2).mean()})()


def loss_mlp() -> LossMLP:
    torch.manual_seed(0)
    return LossMLP().eval()


@pytest.mark.parametrize("kind", ["dora", "vera", "adalora", "rslora_heads"])
def test_peft_directories_of_each_method_load_with_the_same_outputs(kind, tmp_path):
    import peft

    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)
    pm = peft_built(kind, loss_mlp() if kind == "adalora" else make_mlp(), ["fc1", "fc2", "fc3"],
                    lambda m: m(x, t).loss if kind == "adalora" else None)
    pm.save_pretrained(str(tmp_path / "peft"))
    if kind == "adalora":  # PEFT wrote only the kept ranks
        pm = peft.PeftModel.from_pretrained(make_mlp(), str(tmp_path / "peft")).eval()
    gm = lrc.load_peft(make_mlp(), tmp_path / "peft", (inputs(),))
    assert {type(a).__name__ for a in lrc.adapters(gm).values()} == {LRC_CLASS[kind]}
    x2 = inputs(n=5, seed=3)
    with torch.no_grad():
        ref = pm(x2)
        torch.testing.assert_close(gm(x2), ref, rtol=0, atol=1e-6)
        assert (ref - make_mlp()(x2)).abs().max() > 1e-3
    lrc.export(gm, tmp_path / "back", format="peft")  # ...and back out: PeftModel loads lrc's export
    back = peft.PeftModel.from_pretrained(make_mlp(), str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x2), ref, rtol=0, atol=1e-6)


def test_dora_export_is_peft_use_dora_and_refuses_a_mix(tmp_path):
    import peft

    gm = lrc.transform(make_mlp(), "fc*:dora(r=4, alpha=8, dropout=0.0)", example_inputs=(inputs(),))
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
            a.lora_magnitude_vector.mul_(1.3)
    lrc.export(gm, tmp_path / "d", format="peft")
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(make_mlp(), str(tmp_path / "d")).eval()
    x = inputs(n=5, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), gm(x), rtol=0, atol=1e-6)
        assert (gm(x) - make_mlp()(x)).abs().max() > 1e-2
    mix = lrc.transform(make_mlp(), "fc1:dora(r=4); fc2:lora(r=4)", example_inputs=(inputs(),))
    with pytest.raises(ExportError, match="use_dora applies to every site"):
        lrc.export(mix, tmp_path / "mix", format="peft")
    assert not (tmp_path / "mix").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dora", "vera", "adalora", "rslora_heads"])
def test_decoder_both_directions_same_logits_and_greedy_tokens(kind, tmp_path):
    """A stock tiny Llama: PEFT's directory → lrc.load_peft, lrc's export → PeftModel; logits and greedy
    tokens equal PEFT's."""
    import copy

    import peft

    model = make_decoder("llama")
    base = copy.deepcopy(model)
    b = batch(seed=3)

    def loss(m):
        return m(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss

    targets = SPECS["llama"][1]
    pm = peft_built(kind, model, targets, loss)
    pm.save_pretrained(str(tmp_path / "peft"))
    if kind == "adalora":
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    gm = lrc.load_peft(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert (gm(**b).logits - pm(**b).logits).abs().max() < 1e-5
    want = pm.generate(**b, max_new_tokens=8, do_sample=False)
    assert torch.equal(gm.generate(**b, max_new_tokens=8, do_sample=False), want)
    lrc.export(gm, tmp_path / "back", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert (back(**b).logits - pm(**b).logits).abs().max() < 1e-5
    assert torch.equal(back.generate(**b, max_new_tokens=8, do_sample=False), want)
    with torch.no_grad():
        assert (base(**b).logits - pm(**b).logits).abs().max() > 1e-3


@pytest.mark.parametrize("kind,edit", [("vera", {"projection_prng_key": "x"}), ("vera", {"r": 3}),
                                       ("adalora", {"init_r": 0}), ("adalora", {"beta1": 2.0}),
                                       ("vera", {"peft_type": "IA3"})])
def test_bad_method_configs_are_one_line_load_errors(kind, edit, tmp_path):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)
    pm = peft_built(kind, loss_mlp(), ["fc1", "fc2"], lambda m: m(x, t).loss)
    pm.save_pretrained(str(tmp_path / "p"))
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(LoadError) as ei:
        lrc.load_peft(make_mlp(), tmp_path / "p", (inputs(),))
    msg = str(ei.value)
    assert "\n" not in msg and (f"{next(iter(edit))}=" in msg or "peft_type=" in msg)


@pytest.mark.slow
def test_gpt2_conv1d_dora_both_ways(tmp_path):
    """DoRA on GPT-2's Conv1D layout (PEFT fan_in_fan_out): lrc's export → PeftModel, and back with load_peft."""
    import copy

    import peft

    model = make_decoder("gpt2")
    base = copy.deepcopy(model)
    b = batch(seed=3)
    gm = lrc.transform(model, "attn.c_attn:dora(r=4, alpha=8, dropout=0.0); mlp.c_fc:dora(r=4, alpha=8, dropout=0.0)")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(0, 0.2, generator=g)
            a.lora_magnitude_vector.mul_(1.2)
    lrc.export(gm, tmp_path / "p", format="peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    back = lrc.load_peft(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        ref = pm(**b).logits
        assert (gm(**b).logits - ref).abs().max() < 1e-5
        assert (back(**b).logits - ref).abs().max() < 1e-5
        assert (base(**b).logits - ref).abs().max() > 1e-2
