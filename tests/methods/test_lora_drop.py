"""LoRA-drop: warm-up and importance recomputed by hand with autograd + torch.optim.Adam on plain
LoRA, the kept set against the threshold rule, and one shared pair per shape (by identity)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_compiler as lrc
from lowrank_compiler.methods.lora_drop import LoRADrop

SITES = ("inp", "h1", "h2", "h3", "out")
WARM, BATCHES = 3, 5


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.h1, self.h2, self.h3, self.out = (nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                                         nn.Linear(16, 16), nn.Linear(16, 10))

    def forward(self, x):
        for m in (self.inp, self.h1, self.h2, self.h3):
            x = torch.tanh(m(x))
        return self.out(x)


def model() -> Deep:
    torch.manual_seed(0)
    return Deep().eval()


def data():
    """Batches as transform calls them, gm(*batch): (x,); the target is a fixed function of x."""
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 12, generator=g),) for _ in range(BATCHES)]


def loss_fn(out, batch):
    return (out - 2 * torch.sin(batch[0][:, :10])).pow(2).mean()


def dropped(threshold: float = 0.6):
    torch.manual_seed(1)
    spec = f"*:lora_drop(r=4, alpha=8, threshold={threshold}, warmup_steps={WARM}, warmup_lr=0.01)"
    return lrc.transform(model(), spec, example_inputs=(data()[0][0],), data=data(),
                         loss_fn=loss_fn, progress=False)


def reference_importance() -> dict[str, float]:
    """Plain LoRA with the same initial A (same RNG draws), trained by autograd + Adam on the warm-up
    batches, then mean over the remaining batches of Σ‖s·B A x‖² from forward hooks."""
    torch.manual_seed(1)
    gm = lrc.transform(model(), "*:lora(r=4, alpha=8)", example_inputs=(data()[0][0],))
    ads = lrc.adapters(gm)
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=0.01)
    gm.train()
    for (x,) in data()[:WARM]:
        loss_fn(gm(x), (x,)).backward()
        opt.step()
        opt.zero_grad()
    imp = dict.fromkeys(SITES, 0.0)
    hooks = [ads[s].register_forward_hook(
        lambda m, args, out, s=s: imp.__setitem__(s, imp[s] + float(m.lora_branch(args[0]).pow(2).sum())))
        for s in SITES]
    with torch.no_grad():
        for (x,) in data()[WARM:]:
            gm(x)
    for h in hooks:
        h.remove()
    return {s: v / (BATCHES - WARM) for s, v in imp.items()}


@pytest.fixture(scope="module")
def gm():
    return dropped()


def test_importance_matches_autograd_warmup(gm):
    ref = reference_importance()
    ours = {s: float(a.importance) for s, a in lrc.adapters(gm).items()}
    assert min(ref.values()) > 0
    for s in SITES:
        assert ours[s] == pytest.approx(ref[s], rel=1e-4), s


def test_kept_set_follows_threshold_rule_and_shared_pairs_are_one_tensor(gm):
    ads = lrc.adapters(gm)
    imp = {s: float(a.importance) for s, a in ads.items()}
    total = sum(imp.values())
    order = sorted(SITES, key=lambda s: -imp[s])
    kept, cum = set(), 0.0
    for s in order:  # keep the most important until the normalized cumulative importance reaches 0.6
        kept.add(s)
        cum += imp[s] / total
        if cum >= 0.6:
            break
    assert {s for s, a in ads.items() if bool(a.kept)} == kept
    assert 0 < len(kept) < len(SITES)
    shared = [s for s in SITES if s not in kept]
    by_shape: dict[tuple, list[str]] = {}
    for s in shared:
        by_shape.setdefault(tuple(ads[s].lora_B.shape) + tuple(ads[s].lora_A.shape), []).append(s)
    for group in by_shape.values():
        assert all(ads[s].lora_A is ads[group[0]].lora_A and ads[s].lora_B is ads[group[0]].lora_B for s in group)
    ids = [id(ads[s].lora_A) for s in SITES]
    assert len(set(ids)) == len(kept) + len(by_shape)
    n_params = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    assert n_params == sum(ads[s].lora_A.numel() + ads[s].lora_B.numel() for s in kept) + sum(
        ads[g[0]].lora_A.numel() + ads[g[0]].lora_B.numel() for g in by_shape.values())


def test_output_equals_base_after_init_then_trains_shared_pair_once(gm, tmp_path):
    x = data()[0][0]
    torch.testing.assert_close(gm(x), model()(x), rtol=0, atol=1e-6)
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len({id(p) for p in gm.parameters() if p.requires_grad})
    gm.train()
    for (x,) in data():
        loss_fn(gm(x), (x,)).backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    y = gm(x)
    torch.testing.assert_close(lrc.merge(gm)(x), y, rtol=0, atol=1e-5)
    lrc.save(gm, tmp_path / "m.lrc")
    loaded = lrc.load(tmp_path / "m.lrc")
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-6)
    a, b = lrc.adapters(gm), lrc.adapters(loaded)
    for s in SITES:
        for t in SITES:
            assert (a[s].lora_A is a[t].lora_A) == (b[s].lora_A is b[t].lora_A), (s, t)


def test_too_few_init_batches_is_an_init_error():
    with pytest.raises(lrc.errors.InitError, match="init_batches > 3"):
        lrc.transform(model(), "*:lora_drop(r=4, warmup_steps=3)", example_inputs=(data()[0][0],),
                      data=data(), loss_fn=loss_fn, init_batches=3, progress=False)


def test_kept_sites_rule_edge_cases():
    assert LoRADrop.kept_sites(torch.tensor([0.1, 0.6, 0.3]), 0.9).tolist() == [False, True, True]
    assert LoRADrop.kept_sites(torch.tensor([0.1, 0.6, 0.3]), 0.5).tolist() == [False, True, False]
    assert LoRADrop.kept_sites(torch.tensor([0.0, 0.0]), 0.9).tolist() == [True, True]
