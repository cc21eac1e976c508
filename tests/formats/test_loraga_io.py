"""LoRA-GA export and distribution: save/load round trip, the rank-2r pair on the original base (PEFT), DDP."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.common import hidden
from helpers.loraga import batches, target_loss, traced

import lowrank_compiler as lrc
from lowrank_compiler.formats.rebase import original_base_peft

SPEC = "attention.self.*:loraga(r=4, alpha=8); intermediate.dense:loraga(r=4, alpha=8)"


def _trained(kind: str = "bert"):
    """A LoRA-GA model after two SGD steps (so B ≠ B0), its eager original and a probe batch."""
    model, base = traced(kind, dropout=False)
    data, loss_fn = batches(3), target_loss(32)
    gm = lrc.transform(base, SPEC, data=data, loss_fn=loss_fn, progress=False)
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    gm.train()
    for batch in data[:2]:
        opt.zero_grad()
        loss_fn(gm(*batch), batch).backward()
        opt.step()
    gm.eval()
    return model, gm, batches(1, seed=5)[0]


def test_save_load_round_trip_does_not_reinitialize(tmp_path):
    model, gm, (ids,) = _trained()
    path = tmp_path / "m.lrc"
    lrc.save(gm, path)
    loaded = lrc.load(path)
    torch.testing.assert_close(hidden(loaded(ids)), hidden(gm(ids)), atol=1e-6, rtol=0)
    a, b = lrc.adapters(gm), lrc.adapters(loaded)
    assert set(a) == set(b)
    for site in a:
        assert bool(b[site].initialized)
        torch.testing.assert_close(b[site].init_B, a[site].init_B, atol=0, rtol=0)
        # the loaded base is the OFFSET base (not the original): no second offset was applied
        torch.testing.assert_close(loaded.get_parameter(f"{site}.weight"), gm.get_parameter(f"{site}.weight"),
                                   atol=0, rtol=0)
    # merge folds W_offset + s·B A
    torch.testing.assert_close(hidden(lrc.merge(loaded)(ids)), hidden(gm(ids)), atol=1e-5, rtol=0)


def test_rank_2r_pair_runs_on_the_original_base_in_peft():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model, gm, (ids,) = _trained()
    state, kwargs = original_base_peft(gm)
    some = next(iter(lrc.adapters(gm).values()))
    assert kwargs["r"] == 2 * some.r
    pm = get_peft_model(_copy(model), LoraConfig(**kwargs))
    res = set_peft_model_state_dict(pm, state)
    assert not [k for k in res.unexpected_keys if "lora" in k]
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(hidden(pm(ids)), hidden(gm(ids)), atol=1e-5, rtol=0)
        # and it is not the same as the original model (the adapter does something)
        assert (hidden(model(ids)) - hidden(gm(ids))).abs().max() > 1e-3


def _copy(model):
    import copy

    return copy.deepcopy(model)


# -- DDP: 2 gloo processes on CPU --------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, base = traced("bert", dropout=False)
        shard = batches(4)[rank * 2:(rank + 1) * 2]  # each rank its own 2 batches
        gm = lrc.transform(base, "attention.self.query:loraga(r=4); attention.self.value:loraga(r=4, svd='sketch')",
                           data=shard, loss_fn=target_loss(32), progress=False)
        state = {f"{k}.{n}": t for k, a in lrc.adapters(gm).items() for n, t in (("A", a.lora_A), ("B", a.lora_B))}
        torch.save({k: v.detach() for k, v in state.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_compute_identical_init(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert set(r0) == set(r1) and len(r0) == 8
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0)
    # equal to a single process over all 4 batches (mean of the two ranks' means)
    _, base = traced("bert", dropout=False)
    gm = lrc.transform(base, "attention.self.query:loraga(r=4); attention.self.value:loraga(r=4, svd='sketch')",
                       data=batches(4), loss_fn=target_loss(32), progress=False)
    for k, a in lrc.adapters(gm).items():
        for n, t in (("A", a.lora_A), ("B", a.lora_B)):
            ref, got = t.detach(), r0[f"{k}.{n}"]
            # subspaces (sign-invariant): |⟨row_i, row_i'⟩| = c² on the diagonal
            cos = (ref * got).sum(1 if n == "A" else 0).abs() / ref.pow(2).sum(1 if n == "A" else 0)
            assert cos.min() > 0.999, (k, n, cos)
