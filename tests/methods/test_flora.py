"""FLoRA (paper form ``flora`` and residual variant ``flora_res``): per-row multiplicative adapters against
the paper's formula written here, alone vs in a mixed batch, gradients, merge, ONNX per-row graphs."""

from __future__ import annotations

import pytest
import torch
from helpers.common import example_ids, hidden, make_hf
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc
from lowrank_compiler.adapter_sets.mixed import mixed_batch
from lowrank_compiler.ir import verify

FORMS = ("flora", "flora_res")
SPEC = "fc*:{}(r=3, n_adapters=4)"


def flora_model(spec: str = SPEC, model=None, example=None, seed: int = 0, method: str = "flora"):
    """A transformed model with every adapter moved away from its init (outer vectors += N(0, 0.3²))."""
    gm = lrc.transform(model or make_mlp(), spec.format(method), example_inputs=example or (inputs(),))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.flora_out.add_(torch.randn(m.flora_out.shape, generator=g) * 0.3)
    return gm


def paper_flora(x, w0, bias, a, b):
    """The paper's formula for one example, written independently: ``Y = A ∘ ((B ∘ X) W₀)`` summed over the
    r rank-1 terms, with X a row vector (1 × d_in), W₀ = Wᵀ (d_in × d_out), A (r × d_out), B (r × d_in)."""
    y = torch.zeros(1, w0.shape[1], dtype=torch.float64)
    for j in range(a.shape[0]):
        y = y + a[j:j + 1] * ((b[j:j + 1] * x.reshape(1, -1)) @ w0)
    return y.reshape(-1) + bias


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


@pytest.mark.parametrize("method", FORMS)
def test_starts_at_the_base_model(method):
    gm = lrc.transform(make_mlp(), SPEC.format(method), example_inputs=(inputs(),))
    mgm = mixed_batch(gm)
    x = inputs(n=4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), make_mlp()(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(mgm(x, torch.tensor([0, 3, -1, 2])), make_mlp()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", FORMS)
def test_single_linear_matches_the_papers_formula(method):
    lin = torch.nn.Linear(12, 10)
    gm = flora_model("*:{}(r=3, n_adapters=4)", torch.nn.Sequential(lin), (inputs(),), method=method)
    mgm = mixed_batch(gm)
    mod = next(iter(lrc.adapters(gm).values()))
    x, ids = inputs(n=5, seed=2), torch.tensor([3, 0, -1, 1, 3])
    w0, bias = lin.weight.detach().double().t(), lin.bias.detach().double()
    with torch.no_grad():
        got = mgm(x, ids)
        for i, k in enumerate(ids.tolist()):
            if k < 0:
                want = x[i].double() @ w0 + bias
            else:
                a, b = mod.flora_out[k].double(), mod.flora_in[k].double()
                if method == "flora_res":  # the paper's form at rank r + 1 with one all-ones pair
                    a, b = torch.cat([torch.ones(1, 10, dtype=a.dtype), a]), torch.cat([torch.ones(1, 12, dtype=b.dtype), b])
                want = paper_flora(x[i].double(), w0, bias, a, b)
            torch.testing.assert_close(got[i].double(), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(gm(x[:2]).double(), torch.stack([paper_flora(
            x[i].double(), w0, bias, *( (mod.flora_out[0].double(), mod.flora_in[0].double()) if method == "flora"
                                       else (torch.cat([torch.ones(1, 10, dtype=torch.float64), mod.flora_out[0].double()]),
                                             torch.cat([torch.ones(1, 12, dtype=torch.float64), mod.flora_in[0].double()]))))
            for i in range(2)]), rtol=0, atol=1e-5)


def test_paper_form_init_starts_at_base_and_every_vector_learns():
    """Paper init: pair 0 = (1, 1), other pairs silent; unlike the residual form, the first backward step
    reaches inner and outer vectors both (the residual form's inner vectors get exactly zero)."""
    grads = {}
    for method in FORMS:
        gm = lrc.transform(make_mlp(), SPEC.format(method), example_inputs=(inputs(),))
        x = inputs(n=4, seed=9)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), make_mlp()(x), rtol=0, atol=1e-6)
        gm(x).pow(2).sum().backward()
        grads[method] = {n: float(p.grad.abs().max()) for n, p in gm.named_parameters() if p.grad is not None}
    assert grads["flora"] and all(v > 0 for v in grads["flora"].values())
    assert all(v == 0 for n, v in grads["flora_res"].items() if n.endswith("flora_in"))


@pytest.mark.parametrize("method", FORMS)
def test_each_row_equals_its_adapter_alone_eager_and_compiled(method):
    gm = flora_model(method=method)
    mgm = mixed_batch(gm)
    verify(mgm)
    x, ids = inputs(n=6, seed=3), torch.tensor([2, -1, 0, 3, 1, 2])
    with torch.no_grad():
        ref = alone(gm, ids, lambda g, i: g(x[i:i + 1]))
        torch.testing.assert_close(mgm(x, ids), ref, rtol=0, atol=1e-5)
        torch._dynamo.reset()
        torch.testing.assert_close(lrc.compile(mgm, backend="aot_eager")(x, ids), ref, rtol=0, atol=1e-5)
    assert (ref[0] - ref[2]).abs().max() > 1e-3


@pytest.mark.parametrize("method", FORMS)
def test_hf_model_each_row(method):
    ids_in = example_ids(batch=3, seq=5)
    args = (ids_in, torch.ones_like(ids_in))
    gm = flora_model("attention.self.*:{}(r=2, n_adapters=3)", make_hf("bert"), args, method=method)
    mgm = mixed_batch(gm)
    sel = torch.tensor([1, -1, 2])
    with torch.no_grad():
        ref = alone(gm, sel, lambda g, i: hidden(g(*(a[i:i + 1] for a in args))))
        torch.testing.assert_close(hidden(mgm(*args, sel)), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", FORMS)
def test_mixed_training_gives_each_adapter_its_own_gradients(method):
    gm = flora_model(method=method)
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


@pytest.mark.parametrize("method", FORMS)
def test_merge_one_chosen_adapter_and_round_trip(tmp_path, method):
    gm = flora_model(method=method)
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


@pytest.mark.parametrize("method", ["flora", pytest.param("flora_res", marks=pytest.mark.slow)])
def test_ort_mixed_batch_each_row(tmp_path, method):
    pytest.importorskip("onnxruntime")
    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.mixed import export_mixed_onnx, mixed_feeds

    ids_in = example_ids(batch=2, seq=5)
    args = (ids_in, torch.ones_like(ids_in))
    gm = flora_model("attention.self.*:{}(r=2, n_adapters=3)", make_hf("bert"), args, method=method)
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
