"""ALoRA: ablation importance recomputed by brute force from the unmodified model's layers, total rank
conserved, pruned ranks contribute exactly zero, rounds run inside opt.step()."""

from __future__ import annotations

import pytest
import torch
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc
from lowrank_compiler.methods import alora

SITES = ("fc1", "fc2", "fc3")
SPEC = "fc*:alora(r=2, r_max=3, alpha=4, every=2, rounds=2, prune_per_round=2)"


def val():
    """A validation batch as the rounds call it, gm(*batch); the target is a fixed function of x."""
    return (torch.randn(8, 12, generator=torch.Generator().manual_seed(11)),)


def target(x):
    return 2 * torch.sin(x[:, :10])


def loss_fn(out, batch):
    return (out - target(batch[0])).pow(2).mean()


def trained_gm():
    """An ALoRA graph with random (nonzero) B so every rank matters."""
    torch.manual_seed(0)
    gm = lrc.transform(make_mlp(), SPEC, example_inputs=(inputs(),))
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(0, 0.3)
    return gm


def hand_loss(model, ads, gates, batch) -> float:
    """The MLP evaluated by hand: each linear plus s·B diag(g) A x with the given gates."""
    x, t = batch[0], target(batch[0])

    def lin(name, h):
        m, a = getattr(model, name), ads[name]
        return m(h) + a.scaling * (h @ (a.lora_A.T * gates[name]) @ a.lora_B.T)

    y = lin("fc3", torch.tanh(lin("fc2", torch.relu(lin("fc1", x)))))
    return float((y - t).pow(2).mean())


def test_importance_equals_brute_force():
    gm, model = trained_gm(), make_mlp()
    ads = lrc.adapters(gm)
    ours = alora.importance(gm, val(), loss_fn)
    gates = {s: a.gate.clone() for s, a in ads.items()}
    full = -hand_loss(model, ads, gates, val())
    assert len(ours) == 6
    for (s, k), v in ours.items():
        without = {u: g.clone() for u, g in gates.items()}
        without[s][k] = 0
        only = {u: torch.zeros_like(g) for u, g in gates.items()}
        only[s][k] = 1
        ref = full + hand_loss(model, ads, without, val()) - hand_loss(model, ads, only, val())
        assert v == pytest.approx(ref, rel=1e-5, abs=1e-6), (s, k)


def test_round_prunes_lowest_conserves_rank_and_pruned_give_zero():
    gm = trained_gm()
    ads = lrc.adapters(gm)
    scores = alora.importance(gm, val(), loss_fn)
    res = alora.reallocate(gm, val(), loss_fn, 2)
    assert set(res["pruned"]) == set(sorted(scores, key=scores.get)[:2])
    assert sum(a.final_rank() for a in ads.values()) == 6
    lost = {s for s, _ in res["pruned"]}
    assert all(s not in lost for s, _ in res["added"]) or len(lost) == 3
    x = inputs()
    y = gm(x)
    with torch.no_grad():  # garbage in the pruned slots changes nothing, bit for bit
        for s, k in res["pruned"]:
            if (s, k) not in res["added"]:
                ads[s].lora_A[k].normal_(0, 100)
                ads[s].lora_B[:, k].normal_(0, 100)
    assert torch.equal(gm(x), y)
    for a in ads.values():
        f = a.low_rank_factors()
        assert f.A.shape[0] == a.final_rank()
        torch.testing.assert_close(f.scale * f.B @ f.A, a.delta_weight(None), rtol=0, atol=1e-6)
    gm.eval()
    torch.testing.assert_close(lrc.merge(gm)(x), gm(x), rtol=0, atol=1e-5)


def test_rounds_run_inside_opt_step(tmp_path):
    gm = trained_gm()
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    with pytest.raises(lrc.LrcError, match="set_validation"):
        for i in range(2):
            x = inputs(seed=30 + i)
            loss_fn(gm(x), (x,)).backward()
            opt.step()
            opt.zero_grad()
    alora.set_validation(gm, val(), loss_fn)
    gates = []
    for i in range(6):
        x = inputs(seed=40 + i)
        loss_fn(gm(x), (x,)).backward()
        opt.step()
        opt.zero_grad()
        gates.append(torch.cat([a.gate for a in lrc.adapters(gm).values()]).clone())
    ads = lrc.adapters(gm)
    assert all(int(a.rounds_done) == 2 for a in ads.values())
    assert sum(a.final_rank() for a in ads.values()) == 6
    assert not torch.equal(gates[0], gates[1])  # the round at step 4 moved ranks
    lrc.save(gm, tmp_path / "m.lrc")
    loaded = lrc.load(tmp_path / "m.lrc")
    x = inputs()
    torch.testing.assert_close(loaded(x), gm.eval()(x), rtol=0, atol=1e-6)
    assert [a.final_rank() for a in lrc.adapters(loaded).values()] == [a.final_rank() for a in ads.values()]


def test_bad_r_max():
    with pytest.raises(lrc.errors.SpecError, match="r_max=2 must be >= r=4"):
        lrc.Spec.parse("fc*:alora(r=4, r_max=2)")
