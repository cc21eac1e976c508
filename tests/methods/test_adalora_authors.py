"""AdaLoRA driven the authors' way (tests/helpers/adalora_authors.py: their RankAllocator and trainer loop,
re-written with the origin noted) side by side with lrc: t from 0, regulariser in the loss, clipping on."""

from __future__ import annotations

import torch
from helpers.adalora_authors import Allocator, orth_regu, svd_mlp
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc

SITES = ("fc1", "fc2", "fc3")
R, TARGET, ALPHA, GAMMA, CLIP = 6, 3, 4.0, 0.1, 0.005  # the gradient norm is ~0.02: clipping bites
SCHED = dict(tinit=1, tfinal=2, delta_t=2, total=8)


def spec(**extra) -> str:
    args = dict(init_r=R, target_r=TARGET, alpha=ALPHA * R / (R + 1e-5), tinit=1, tfinal=2, deltaT=2,
                total_step=8, orth_reg=GAMMA, **extra)
    return "fc*:adalora(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


def batch(i: int):
    g = torch.Generator().manual_seed(70 + i)
    return torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)


def pair(**extra):
    gm = lrc.transform(make_mlp(), spec(**extra), example_inputs=(inputs(),))
    ref = svd_mlp(make_mlp(), SITES, R, ALPHA)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for site, ad in lrc.adapters(gm).items():
            ad.lora_E.copy_(torch.randn(ad.lora_E.shape, generator=g))
            for w in "AEB":
                getattr(getattr(ref, site), f"lora_{w}").copy_(getattr(ad, f"lora_{w}"))
    return gm, ref


def run_authors(ref, steps: int, shift: int = 0):
    """The authors' loop; yields after each step. ``shift`` adds to the step number they pass."""
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    alloc = Allocator(ref, R, TARGET, **SCHED)
    for step in range(steps):
        x, t = batch(step)
        ((ref(x) - t).pow(2).mean() + orth_regu(ref, GAMMA)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], CLIP)
        opt.step()
        alloc.update_and_mask(step + shift)
        opt.zero_grad()
        yield step


def run_lrc(gm, steps: int, in_loss: bool = True):
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    ads = list(lrc.adapters(gm).values())
    for step in range(steps):
        x, t = batch(step)
        loss = (gm(x) - t).pow(2).mean()
        if in_loss:
            loss = loss + lrc.training.orth_loss(ads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in gm.parameters() if p.requires_grad], CLIP)
        opt.step()
        opt.zero_grad()
        yield step


def state(gm, ref):
    for site, ad in lrc.adapters(gm).items():
        for w in "AEB":
            yield f"{site}.lora_{w}", getattr(ad, f"lora_{w}"), getattr(getattr(ref, site), f"lora_{w}")


def test_authors_loop_and_lrc_agree_step_by_step():
    gm, ref = pair(orth_in_loss=True)
    masked = 0
    for step, _ in zip(run_authors(ref, 10), run_lrc(gm, 10)):
        for name, ours, theirs in state(gm, ref):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6, msg=f"step {step} {name}")
            if name.endswith("lora_E"):
                assert torch.equal(ours.view(-1) == 0, theirs.view(-1) == 0), f"step {step} {name} mask"
                masked += int((theirs == 0).any())
    assert masked > 0
    assert sum(a.final_rank() for a in lrc.adapters(gm).values()) == TARGET * len(SITES)


def test_old_numbering_is_the_authors_loop_one_step_later():
    gm, ref = pair(orth_in_loss=True, step_from=1)
    for step, _ in zip(run_authors(ref, 10, shift=1), run_lrc(gm, 10)):
        for name, ours, theirs in state(gm, ref):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6, msg=f"step {step} {name}")
    gm1, _ = pair(orth_in_loss=True, step_from=1)  # ...and other masks than the default (t from 0) on the way
    gm0, _ = pair(orth_in_loss=True)
    differ = 0
    for _ in zip(run_lrc(gm0, 10), run_lrc(gm1, 10)):
        differ += sum(not torch.equal(a.lora_E == 0, b.lora_E == 0)
                      for a, b in zip(lrc.adapters(gm0).values(), lrc.adapters(gm1).values()))
    assert differ > 0


def test_regulariser_outside_the_loss_is_not_clipped():
    gm, ref = pair(orth_in_loss=False)
    for _ in zip(run_authors(ref, 5), run_lrc(gm, 5, in_loss=False)):
        pass
    assert max(float((o - t).abs().max()) for _, o, t in state(gm, ref)) > 1e-4
