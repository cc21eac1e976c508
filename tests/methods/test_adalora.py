"""AdaLoRA against PEFT's AdaLoraModel + RankAllocator (same P, λ, Q; same loop; PEFT calls
update_and_allocate(global_step from 0) by hand, ours runs the schedule inside opt.step()). The authors'
own loop, with clipping and the regulariser in the loss, is in test_adalora_authors.py."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from helpers.common import LabeledIds, tiny_bert_classifier, trainer_args
from helpers.mlp import MLP, inputs, make_mlp

import lowrank_compiler as lrc

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
SITES = ("fc1", "fc2", "fc3")
SCHED = dict(init_r=6, target_r=3, tinit=1, tfinal=2, deltaT=2, total_step=8)
SPEC = "fc*:adalora(init_r=6, target_r=3, alpha=4, tinit=1, tfinal=2, deltaT=2, total_step=8, orth_reg=0.3)"


@dataclass
class Out(transformers.utils.ModelOutput):
    loss: torch.Tensor | None = None


class WithLoss(torch.nn.Module):
    """The MLP returning a ModelOutput with .loss, so PEFT's AdaLoraModel adds its regulariser."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x, t):
        return Out(loss=(self.mlp(x) - t).pow(2).mean())


def batch(i: int):
    g = torch.Generator().manual_seed(50 + i)
    return torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)


def pair():
    """(ours, PEFT) with identical P, λ (random, nonzero), Q and base weights."""
    gm = lrc.transform(make_mlp(), SPEC, example_inputs=(inputs(),))
    cfg = peft.AdaLoraConfig(lora_alpha=4, target_modules=list(SITES), orth_reg_weight=0.3, **SCHED)
    pm = peft.get_peft_model(WithLoss(make_mlp()), cfg)
    torch.manual_seed(9)
    with torch.no_grad():
        for site, ad in lrc.adapters(gm).items():
            lay = getattr(pm.base_model.model.mlp, site)
            ad.lora_E.normal_()
            for n in ("A", "B", "E"):
                getattr(lay, f"lora_{n}")["default"].copy_(getattr(ad, f"lora_{n}"))
    return gm, pm


def test_forward_and_regulariser_match_peft():
    gm, pm = pair()
    x, t = batch(0)
    ref = pm.base_model(x, t)
    ours = (gm(x) - t).pow(2).mean()
    torch.testing.assert_close(pm.base_model.model.mlp(x), gm(x), rtol=0, atol=1e-5)
    ads = list(lrc.adapters(gm).values())
    reg = sum(a.loss_terms() for a in ads) / len(ads)  # the pool's R is the mean of the per-site terms
    torch.testing.assert_close(ref.loss, ours + reg, rtol=0, atol=1e-5)


def test_schedule_masks_and_budget_match_peft():
    gm, pm = pair()
    opt = lrc.optimizer(gm, torch.optim.SGD, lr=0.05)
    ref_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    alloc = pm.base_model.rankallocator
    ads = lrc.adapters(gm)
    masked_steps = 0
    for step in range(0, 10):  # PEFT's example loop numbers steps from 0 (lrc's default step_from=0); past
        # total_step the final mask is re-applied
        x, t = batch(step)
        pm.base_model(x, t).loss.backward()
        ref_opt.step()
        pm.base_model.update_and_allocate(step)
        ref_opt.zero_grad()
        (gm(x) - t).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pool = list(ads.values())
        assert pool[0].budget_schedule(pool, step) == alloc.budget_schedule(step)
        for site, ad in ads.items():
            lay = getattr(pm.base_model.model.mlp, site)
            for n in ("A", "B", "E"):
                torch.testing.assert_close(getattr(ad, f"lora_{n}"), getattr(lay, f"lora_{n}")["default"],
                                           rtol=0, atol=1e-5, msg=f"step {step} {site} lora_{n}")
            e_ref = lay.lora_E["default"].view(-1)
            assert torch.equal(ad.lora_E.view(-1) == 0, e_ref == 0), f"step {step} {site} mask"
            masked_steps += int((e_ref == 0).any())
            if step < 6:
                key = next(k for k in alloc.exp_avg_ipt if k.endswith(f"mlp.{site}.lora_A.default"))
                torch.testing.assert_close(ad.ipt_A, alloc.exp_avg_ipt[key], rtol=1e-4, atol=1e-7)
    assert masked_steps > 0
    kept = sum(a.final_rank() for a in ads.values())
    assert kept == alloc.target_bgt == 3 * 3
    rp = pm.peft_config["default"].rank_pattern
    for site, ad in ads.items():
        pattern = next(v for k, v in rp.items() if f"mlp.{site}." in k)
        assert ad.rank_mask.tolist() == pattern


def trained(steps: int, gm=None, opt=None, start: int = 1):
    if gm is None:
        gm = lrc.transform(make_mlp(), SPEC, example_inputs=(inputs(),))
        with torch.no_grad():
            for ad in lrc.adapters(gm).values():
                ad.lora_E.normal_(generator=torch.Generator().manual_seed(3))
        opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    for step in range(start, start + steps):
        x, t = batch(step)
        (gm(x) - t).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return gm, opt


def test_save_load_continue_equals_never_stopping(tmp_path):
    ref, _ = trained(9)
    gm, opt = trained(4)
    lrc.save(gm, tmp_path / "m.lrc")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = lrc.load(tmp_path / "m.lrc")
    loaded.train()
    opt2 = lrc.optimizer(loaded, torch.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    trained(5, loaded, opt2, start=5)
    for (site, a), b in zip(lrc.adapters(ref).items(), lrc.adapters(loaded).values()):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-6, msg=f"{site}.{k}")
        assert torch.equal(a.rank_mask, b.rank_mask)


def test_merge_and_factors_drop_masked_ranks():
    gm, _ = trained(9)
    gm.eval()
    x = inputs()
    y = gm(x)
    ranks = {s: a.final_rank() for s, a in lrc.adapters(gm).items()}
    assert sum(ranks.values()) == 9 and min(ranks.values()) < 6
    for site, ad in lrc.adapters(gm).items():
        f = ad.low_rank_factors()
        assert f.A.shape[0] == f.B.shape[1] == max(ranks[site], 1)
        w = gm.get_parameter(f"{site}.weight")
        torch.testing.assert_close(f.scale * f.B @ f.A, ad.delta_weight(w), rtol=0, atol=1e-6)
    torch.testing.assert_close(lrc.merge(gm)(x), y, rtol=0, atol=1e-5)


def test_orth_gradient_equals_autograd_of_the_regulariser():
    gm = lrc.transform(make_mlp(), SPEC, example_inputs=(inputs(),))
    ads = list(lrc.adapters(gm).values())
    reg = sum(a.loss_terms() for a in ads) / len(ads)
    reg.backward()
    expect = {id(p): p.grad.clone() for a in ads for p in (a.lora_A, a.lora_B)}
    for a in ads:
        a.lora_A.grad = a.lora_B.grad = None
    type(ads[0]).before_step_all(ads, None)
    for a in ads:
        for p in (a.lora_A, a.lora_B):
            torch.testing.assert_close(p.grad, expect[id(p)], rtol=1e-5, atol=1e-7)


def test_total_step_is_required_and_schedule_checked():
    with pytest.raises(lrc.errors.SpecError, match="total_step is required"):
        lrc.Spec.parse("fc*:adalora(init_r=4)")
    with pytest.raises(lrc.errors.SpecError, match="target_r=8 must be <= init_r=4"):
        lrc.Spec.parse("fc*:adalora(init_r=4, target_r=8, total_step=10)")
    with pytest.raises(lrc.errors.SpecError, match="no budgeting phase"):
        lrc.Spec.parse("fc*:adalora(total_step=10, tinit=5, tfinal=5)")


@pytest.mark.slow
def test_hf_trainer_runs_the_schedule_without_a_callback(tmp_path):
    model, ids, example = tiny_bert_classifier()
    spec = "attention.self.[qv][ua]*:adalora(init_r=4, target_r=2, total_step=4, tfinal=1)"
    gm = lrc.transform(model, spec, example_inputs=(ids,), example_kwargs=example)
    args = trainer_args(tmp_path, 4)
    opt, sched = lrc.training.trainer_optimizers(gm, torch.optim.AdamW, lr=1e-2)
    transformers.Trainer(model=gm, args=args, train_dataset=LabeledIds(16), optimizers=(opt, sched)).train()
    ads = list(lrc.adapters(gm).values())
    assert len(ads) == 4 and all(int(a.steps) == 4 for a in ads)
    assert sum(a.final_rank() for a in ads) == 2 * 4  # the target budget, reached inside opt.step()
    copy.deepcopy(gm)


def test_inspect_shows_the_rank_each_site_ended_with(tmp_path):
    from lowrank_compiler.cli import main

    gm, _ = trained(9)
    lrc.save(gm, tmp_path / "m.lrc")
    ranks = {s: a.final_rank() for s, a in lrc.adapters(gm).items()}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["inspect", str(tmp_path / "m.lrc")])
    for site, r in ranks.items():
        line = next(ln for ln in buf.getvalue().splitlines() if ln.startswith(site + " "))
        assert f"rank now {r}" in line


def test_peft_and_onnx_exports_shrink_to_the_remaining_ranks(tmp_path):
    from safetensors.torch import load_file

    gm, _ = trained(9)
    gm.eval()
    ranks = {s: a.final_rank() for s, a in lrc.adapters(gm).items()}
    lrc.export(gm, tmp_path / "peft", format="peft")
    shapes = {k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    for site, r in ranks.items():
        assert shapes[f"base_model.model.{site}.lora_A.weight"][0] == r
    ref = peft.PeftModel.from_pretrained(make_mlp(), str(tmp_path / "peft")).eval()
    x = inputs()
    torch.testing.assert_close(ref(x), gm(x), rtol=0, atol=1e-5)
    pytest.importorskip("onnxruntime")
    report = lrc.export(gm, tmp_path / "m.onnx", format="onnx")
    assert report["max_abs_diff"] < 1e-5
