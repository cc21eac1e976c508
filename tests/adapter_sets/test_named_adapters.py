"""Named adapters (add/set/delete/disable, save/load) against PEFT's multi-adapter model on the same weights."""

from __future__ import annotations

import pytest
import torch
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc
from lowrank_compiler.api import trainable_parameters
from lowrank_compiler.ir import verify

peft = pytest.importorskip("peft")
SITES = ("fc1", "fc2", "fc3")
CONFIGS = {"default": dict(r=4, lora_alpha=8), "b": dict(r=2, lora_alpha=4), "c": dict(r=6, lora_alpha=3)}


def spec(cfg: dict) -> str:
    return f"fc*:lora(r={cfg['r']}, alpha={cfg['lora_alpha']})"


def pair():
    """A PEFT model and ours with adapters default, b, c holding the same (non-zero) tensors."""
    pm = peft.get_peft_model(make_mlp(), peft.LoraConfig(target_modules=list(SITES), **CONFIGS["default"]))
    gm = lrc.transform(make_mlp(), spec(CONFIGS["default"]), example_inputs=(inputs(),))
    for name in ("b", "c"):
        pm.add_adapter(name, peft.LoraConfig(target_modules=list(SITES), **CONFIGS[name]))
        lrc.adapter_sets.add_adapter(gm, name, spec(CONFIGS[name]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name in CONFIGS:
            lrc.adapter_sets.set_adapter(gm, name)
            for site in SITES:
                lay, ours = getattr(pm.base_model.model, site), lrc.adapters(gm)[site]
                lay.lora_B[name].weight.normal_(0, 0.2)
                ours.lora_A.copy_(lay.lora_A[name].weight)
                ours.lora_B.copy_(lay.lora_B[name].weight)
    lrc.adapter_sets.set_adapter(gm, "default")
    return pm, gm


def test_switching_matches_peft():
    pm, gm = pair()
    x = inputs(seed=4)
    seen = []
    for name in ("b", "default", "c", "b"):
        pm.set_adapter(name)
        lrc.adapter_sets.set_adapter(gm, name)
        verify(gm)
        assert lrc.adapter_sets.active_adapter(gm) == name
        with torch.no_grad():
            ref, got = pm(x), gm(x)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        seen.append(got)
    assert (seen[0] - seen[1]).abs().max() > 1e-3  # the adapters differ, so switching is observable
    with pm.disable_adapter(), lrc.adapter_sets.disable_adapters(gm), torch.no_grad():
        torch.testing.assert_close(gm(x), pm(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(gm(x), make_mlp()(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), seen[-1], rtol=0, atol=0)  # restored after the context


def test_only_the_active_adapter_trains_as_in_peft():
    pm, gm = pair()
    pm.set_adapter("b")
    lrc.adapter_sets.set_adapter(gm, "b")
    ours = {n for n, p in gm.named_parameters() if p.requires_grad}
    theirs = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert len(ours) == len(theirs) == 6 and all(".b." in n for n in theirs)
    assert ours == {f"{s}.adapter.lora_{w}" for s in SITES for w in "AB"}
    assert trainable_parameters(gm) == (sum(p.numel() for p in pm.parameters() if p.requires_grad),
                                            sum(p.numel() for p in pm.parameters()))
    opt = lrc.optimizer(gm, torch.optim.SGD, lr=0.1)
    ref = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for model, o in ((gm, opt), (pm, ref)):
        model(inputs(seed=9)).pow(2).mean().backward()
        o.step()
    lrc.adapter_sets.set_adapter(gm, "default")
    pm.set_adapter("default")
    lrc.adapter_sets.set_adapter(gm, "b")  # trained values survive the round trip through the store
    pm.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(gm(inputs()), pm(inputs()), rtol=0, atol=1e-6)


def test_delete_like_peft():
    pm, gm = pair()
    pm.set_adapter("b")
    lrc.adapter_sets.set_adapter(gm, "b")
    pm.delete_adapter("b")
    lrc.adapter_sets.delete_adapter(gm, "b")
    assert sorted(lrc.adapter_sets.adapter_names(gm)) == sorted(pm.peft_config) == ["c", "default"]
    assert lrc.adapter_sets.active_adapter(gm) == pm.active_adapter
    with torch.no_grad():
        torch.testing.assert_close(gm(inputs()), pm(inputs()), rtol=0, atol=1e-6)
    with pytest.raises(lrc.LrcError, match="no adapter named 'b'"):
        lrc.adapter_sets.set_adapter(gm, "b")
    lrc.adapter_sets.delete_adapter(gm, "c" if lrc.adapter_sets.active_adapter(gm) != "c" else "default")
    with pytest.raises(lrc.LrcError, match="only adapter"):
        lrc.adapter_sets.delete_adapter(gm, lrc.adapter_sets.active_adapter(gm))


def test_errors_name_the_problem():
    _, gm = pair()
    with pytest.raises(lrc.LrcError, match="already exists"):
        lrc.adapter_sets.add_adapter(gm, "b", "fc*:lora(r=2)")
    with pytest.raises(lrc.errors.SpecError, match="same sites"):
        lrc.adapter_sets.add_adapter(gm, "d", "fc1:lora(r=2)")
    lrc.merge(gm, keep_adapters=True)
    with pytest.raises(lrc.LrcError, match="unmerge"):
        lrc.adapter_sets.set_adapter(gm, "b")
    lrc.unmerge(gm)


def test_merge_and_save_see_the_active_adapter(tmp_path):
    pm, gm = pair()
    pm.set_adapter("c")
    lrc.adapter_sets.set_adapter(gm, "c")
    x = inputs(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(lrc.merge(gm)(x), pm(x), rtol=0, atol=1e-5)
    paths = lrc.adapter_sets.save_named_adapters(gm, tmp_path / "named")
    assert sorted(p.stem for p in paths) == ["b", "c", "default"]
    fresh = lrc.transform(make_mlp(), spec(CONFIGS["default"]), example_inputs=(inputs(),))
    lrc.adapter_sets.load_named_adapters(fresh, tmp_path / "named")
    assert lrc.adapter_sets.active_adapter(fresh) == "c" and sorted(lrc.adapter_sets.adapter_names(fresh)) == ["b", "c", "default"]
    for name in CONFIGS:
        pm.set_adapter(name)
        lrc.adapter_sets.set_adapter(fresh, name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), pm(x), rtol=0, atol=1e-6)
    # one set's file is the save_adapters format: it loads into a model whose active set has that shape
    other = lrc.transform(make_mlp(), spec(CONFIGS["b"]), example_inputs=(inputs(),))
    lrc.load_adapters(other, tmp_path / "named" / "b.safetensors")
    lrc.adapter_sets.load_adapter(other, tmp_path / "named" / "c.safetensors", "c")
    pm.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(other(x), pm(x), rtol=0, atol=1e-6)
    lrc.adapter_sets.set_adapter(other, "c")
    pm.set_adapter("c")
    with torch.no_grad():
        torch.testing.assert_close(other(x), pm(x), rtol=0, atol=1e-6)


def test_named_adapters_of_other_methods_switch():
    gm = lrc.transform(make_mlp(), "fc*:dora(r=4, alpha=8, dropout=0.0)", example_inputs=(inputs(),))
    lrc.adapter_sets.add_adapter(gm, "v", "fc*:vera(r=8, d_init=0.5)")
    x = inputs()
    with torch.no_grad():
        lrc.adapters(gm)["fc1"].lora_B.normal_()
        d = gm(x)
        lrc.adapter_sets.set_adapter(gm, "v")
        for m in lrc.adapters(gm).values():
            m.vera_lambda_b.normal_()
        v = gm(x)
        lrc.adapter_sets.set_adapter(gm, "default")
        torch.testing.assert_close(gm(x), d, rtol=0, atol=0)
        assert (v - d).abs().max() > 1e-3
    with pytest.raises(lrc.errors.SpecError, match="share one base weight"):
        lrc.adapter_sets.add_adapter(gm, "ga", "fc*:delta_lora(r=4)")
