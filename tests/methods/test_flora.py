"""FLoRA: per-row multiplicative adapters against the formula, alone vs in a mixed batch, gradients, merge."""

from __future__ import annotations

import torch
from helpers.common import example_ids, hidden, make_hf
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc
from lowrank_compiler.adapter_sets.mixed import mixed_batch
from lowrank_compiler.ir import verify

SPEC = "fc*:flora(r=3, n_adapters=4)"


def flora_model(spec: str = SPEC, model=None, example=None, seed: int = 0):
    gm = lrc.transform(model or make_mlp(), spec, example_inputs=example or (inputs(),))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.flora_out.copy_(torch.randn(m.flora_out.shape, generator=g) * 0.3)
    return gm


def select(gm, k: int) -> None:
    for m in lrc.adapters(gm).values():
        m.select(k)


def alone(gm, ids, call):
    outs = []
    for i, k in enumerate(ids.tolist()):
        if k < 0:
            for m in lrc.adapters(gm).values():
                m.bypass = True
            outs.append(call(gm, i))
            for m in lrc.adapters(gm).values():
                m.bypass = False
        else:
            select(gm, k)
            outs.append(call(gm, i))
    select(gm, 0)
    return torch.cat(outs)


def test_starts_at_the_base_model():
    gm = lrc.transform(make_mlp(), SPEC, example_inputs=(inputs(),))
    mgm = mixed_batch(gm)
    x = inputs(n=4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), make_mlp()(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(mgm(x, torch.tensor([0, 3, -1, 2])), make_mlp()(x), rtol=0, atol=1e-6)


def test_single_linear_matches_the_formula():
    lin = torch.nn.Linear(12, 10)
    gm = flora_model("*:flora(r=3, n_adapters=4)",
                     torch.nn.Sequential(lin), (inputs(),))
    mgm = mixed_batch(gm)
    mod = next(iter(lrc.adapters(gm).values()))
    x, ids = inputs(n=5, seed=2), torch.tensor([3, 0, -1, 1, 3])
    with torch.no_grad():
        got = mgm(x, ids)
        for i, k in enumerate(ids.tolist()):
            w = lin.weight if k < 0 else lin.weight * (1 + mod.flora_out[k].t() @ mod.flora_in[k])
            torch.testing.assert_close(got[i], w @ x[i] + lin.bias, rtol=0, atol=1e-5)


def test_each_row_equals_its_adapter_alone_eager_and_compiled():
    gm = flora_model()
    mgm = mixed_batch(gm)
    verify(mgm)
    x, ids = inputs(n=6, seed=3), torch.tensor([2, -1, 0, 3, 1, 2])
    with torch.no_grad():
        ref = alone(gm, ids, lambda g, i: g(x[i:i + 1]))
        torch.testing.assert_close(mgm(x, ids), ref, rtol=0, atol=1e-5)
        torch._dynamo.reset()
        torch.testing.assert_close(lrc.compile(mgm, backend="aot_eager")(x, ids), ref, rtol=0, atol=1e-5)
    assert (ref[0] - ref[2]).abs().max() > 1e-3


def test_hf_model_each_row():
    ids_in = example_ids(batch=3, seq=5)
    args = (ids_in, torch.ones_like(ids_in))
    gm = flora_model("attention.self.*:flora(r=2, n_adapters=3)", make_hf("bert"), args)
    mgm = mixed_batch(gm)
    sel = torch.tensor([1, -1, 2])
    with torch.no_grad():
        ref = alone(gm, sel, lambda g, i: hidden(g(*(a[i:i + 1] for a in args))))
        torch.testing.assert_close(hidden(mgm(*args, sel)), ref, rtol=0, atol=1e-5)


def test_mixed_training_gives_each_adapter_its_own_gradients():
    gm = flora_model()
    mgm = mixed_batch(gm)
    x, t = inputs(n=8, seed=5), torch.randn(8, 10, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([1, 0, -1, 3, 0, 1, 3, 2])
    loss = lambda y, rows: (y - t[rows]).pow(2).sum()  # noqa: E731
    loss(mgm(x, ids), slice(None)).backward()
    mods = lrc.adapters(gm)
    mixed = {(s, n): getattr(m, n).grad.clone() for s, m in mods.items() for n in ("flora_in", "flora_out")}
    for k in range(4):
        for m in mods.values():
            m.zero_grad()
        select(gm, k)
        rows = (ids == k).nonzero().flatten()
        loss(gm(x[rows]), rows).backward()
        for (s, n), g in mixed.items():
            own = getattr(mods[s], n).grad
            torch.testing.assert_close(own[k], g[k], rtol=1e-4, atol=1e-5)
            assert own[[j for j in range(4) if j != k]].abs().max() == 0
    assert all(g.abs().max() > 0 for g in mixed.values())


def test_merge_one_chosen_adapter_and_round_trip(tmp_path):
    gm = flora_model()
    x = inputs(n=4, seed=7)
    select(gm, 2)
    with torch.no_grad():
        want = gm(x)
        torch.testing.assert_close(lrc.merge(gm)(x), want, rtol=0, atol=1e-5)
        lrc.merge(gm, keep_adapters=True)
        torch.testing.assert_close(gm(x), want, rtol=0, atol=1e-5)
        lrc.unmerge(gm)
        torch.testing.assert_close(gm(x), want, rtol=0, atol=1e-5)
    lrc.save(gm, tmp_path / "f.lrc")
    back = lrc.load(tmp_path / "f.lrc")
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=0, atol=1e-6)
    assert int(next(iter(lrc.adapters(back).values())).active) == 2


def test_ort_mixed_batch_each_row(tmp_path):
    import pytest

    pytest.importorskip("onnxruntime")
    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.mixed import export_mixed_onnx, mixed_feeds

    ids_in = example_ids(batch=2, seq=5)
    args = (ids_in, torch.ones_like(ids_in))
    gm = flora_model("attention.self.*:flora(r=2, n_adapters=3)", make_hf("bert"), args)
    mgm = mixed_batch(gm)
    rep = export_mixed_onnx(mgm, tmp_path / "flora.onnx")
    assert rep["max_abs_diff"] < 1e-5
    sess = session(tmp_path / "flora.onnx", providers="cpu")
    x = example_ids(batch=4, seq=6, seed=2)
    mask = torch.ones_like(x)
    sel = torch.tensor([2, -1, 0, 1])
    with torch.no_grad():
        ref = alone(gm, sel, lambda g, i: hidden(g(x[i:i + 1], mask[i:i + 1]))).numpy()
    got = sess({"input_ids": x, "attention_mask": mask, "adapter_ids": sel})[0]
    assert abs(got - ref).max() < 1e-5
    with torch.no_grad():  # retrained adapters: new values for the same inputs, no re-export
        for m in lrc.adapters(gm).values():
            m.flora_in.mul_(1.5)
        ref = alone(gm, sel, lambda g, i: hidden(g(x[i:i + 1], mask[i:i + 1]))).numpy()
    got = sess({"input_ids": x, "attention_mask": mask, "adapter_ids": sel, **mixed_feeds(mgm)})[0]
    assert abs(got - ref).max() < 1e-5
