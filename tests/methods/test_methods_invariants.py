"""Invariants every training-time method keeps: base output at init, merge == unmerged after
training, save/load round trips, export through the merge pass, the user's model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.mlp import inputs, make_mlp
from torch import nn

import lowrank_compiler as lrc
from lowrank_compiler.ir import META_KEY, AdapterMark

SPECS = {
    "lora_plus": "fc*:lora_plus(r=4, alpha=8, ratio=4)",
    "lora_fa": "fc*:lora_fa(r=4, alpha=8)",
    "dora": "fc*:dora(r=4, alpha=8, dropout=0.1)",
    "dora_fa": "fc*:dora_fa(r=4, alpha=8, dropout=0.1)",
    "lora_pissa": "fc*:lora(r=4, alpha=8, init='pissa')",
    "vera": "fc*:vera(r=8, d_init=0.1)",
    "delta_lora": "fc*:delta_lora(r=4, alpha=8, ratio=2, start=1)",
    "lora_pro": "fc*:lora_pro(r=4, alpha=8)",
    "lorasc": "fc*:lorasc(r=4, alpha=8, cascade_every=2, slow_rate=0.5, noise=0.01)",
    "adalora": "fc*:adalora(init_r=4, target_r=2, total_step=3)",
    "alora": "fc*:alora(r=2, r_max=4, alpha=4, rounds=0)",
    "flora": "fc*:flora(r=2, n_adapters=2)",
    "flora_res": "fc*:flora_res(r=2, n_adapters=2)",
}


def name_of(key: str) -> str:
    """The registered method name in ``SPECS[key]`` (a key may name a variant, e.g. lora_pissa)."""
    return SPECS[key].split(":", 1)[1].split("(", 1)[0]


def train(gm: nn.Module, steps: int = 3, lr: float = 3e-2) -> torch.optim.Optimizer:
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=lr)
    gm.train()
    target = torch.randn(6, 10, generator=torch.Generator().manual_seed(7))
    for i in range(steps):
        loss = (gm(inputs(seed=10 + i)) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    return opt


@pytest.mark.parametrize("method", list(SPECS))
def test_output_equals_base_at_init(method):
    model = make_mlp()
    x = inputs()
    gm = lrc.transform(model, SPECS[method], example_inputs=(x,))
    assert {type(a).name for a in lrc.adapters(gm).values()} == {name_of(method)}
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(SPECS))
def test_trained_merge_equals_unmerged_and_user_model_untouched(method):
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    x = inputs()
    gm = lrc.transform(model, SPECS[method], example_inputs=(x,))
    train(gm)
    y = gm(x)
    assert (y - model(x)).abs().max() > 1e-4, "training changed nothing"
    for k, v in model.state_dict().items():  # delta_lora / lorasc write new base Parameters, not the user's
        assert torch.equal(v, before[k]), k
    merged = lrc.merge(gm)
    assert not any(isinstance(m, lrc.AdapterMethod) for m in merged.modules())
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-5)
    lrc.merge(gm, keep_adapters=True)
    torch.testing.assert_close(gm(x), y, rtol=0, atol=1e-5)
    lrc.unmerge(gm)
    torch.testing.assert_close(gm(x), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(SPECS))
def test_save_load_round_trip(method, tmp_path):
    model = make_mlp()
    x = inputs()
    gm = lrc.transform(model, SPECS[method], example_inputs=(x,))
    train(gm)
    y = gm(x)
    lrc.save(gm, tmp_path / "m.lrc")
    loaded = lrc.load(tmp_path / "m.lrc")
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-6)
    assert [type(a).name for a in lrc.adapters(loaded).values()] == [name_of(method)] * 3
    # adapter-only files: same tensors come back into a fresh transform
    lrc.save_adapters(gm, tmp_path / "a.safetensors")
    fresh = lrc.transform(make_mlp(), SPECS[method], example_inputs=(x,))
    lrc.load_adapters(fresh, tmp_path / "a.safetensors")
    for (site, a), b in zip(lrc.adapters(gm).items(), lrc.adapters(fresh).values()):
        for (k, t), u in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(t, u), f"{site}.{k}"
    if not type(next(iter(lrc.adapters(gm).values()))).modifies_base:
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(SPECS))
def test_export_through_merge_pass(method):
    """The merged graph is plain linears (zero inference overhead) and exports with torch.export."""
    model = make_mlp()
    x = inputs()
    gm = lrc.transform(model, SPECS[method], example_inputs=(x,))
    train(gm)
    merged = lrc.merge(gm)
    assert not [n for n in merged.graph.nodes if isinstance(n.meta.get(META_KEY), AdapterMark)]
    ep = torch.export.export(merged, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), gm(x), rtol=0, atol=1e-5)
