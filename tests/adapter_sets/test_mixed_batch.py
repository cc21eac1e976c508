"""Mixed-adapter batches: each row equals running it alone with its adapter (eager, compiled), PEFT's
``adapter_names=`` as the LoRA reference, per-adapter gradients equal training each alone on its rows."""

from __future__ import annotations

import pytest
import torch
from helpers.common import example_ids, hidden, make_hf
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc
from lowrank_compiler.adapter_sets.mixed import adapter_ids, mixed_add, mixed_batch, refresh
from lowrank_compiler.ir import verify

SPECS = {
    "lora": ["fc*:lora(r=4, alpha=8)", "fc*:lora(r=2, alpha=3)", "fc*:lora(r=6, alpha=6, rslora=true)"],
    "dora": ["fc*:dora(r=4, alpha=8, dropout=0.0)", "fc*:dora(r=2, alpha=2, dropout=0.0)"],
    "vera": ["fc*:vera(r=8, d_init=0.5)", "fc*:vera(r=6, d_init=0.2, seed=3)"],
    "mixed": ["fc*:lora(r=4, alpha=8)", "fc*:dora(r=2, alpha=4, dropout=0.0)", "fc*:vera(r=8)"],
}
NAMES = ["a0", "a1", "a2"]


def randomize(gm, seed: int = 0) -> None:
    """Non-zero values in every trainable adapter tensor of the active set (B, Λ_b, magnitude...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lrc.adapters(gm).values():
            for p in mod.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def named_model(specs: list[str], model=None, example=None):
    """A transformed model with one named set per spec ("a0" first, as add_adapter gives them)."""
    gm = lrc.transform(model or make_mlp(), specs[0], example_inputs=example or (inputs(),))
    for i, s in enumerate(specs[1:], 1):
        lrc.adapter_sets.add_adapter(gm, f"a{i}", s)
    for i in range(len(specs)):
        name = "default" if i == 0 else f"a{i}"
        lrc.adapter_sets.set_adapter(gm, name)
        randomize(gm, seed=i)
    lrc.adapter_sets.set_adapter(gm, "default")
    return gm, ["default"] + [f"a{i}" for i in range(1, len(specs))]


def alone(gm, names, ids, call):
    """Reference: each row run by itself through ``gm`` with its adapter active (−1: adapters disabled)."""
    active = lrc.adapter_sets.active_adapter(gm)
    outs = []
    for i, k in enumerate(ids.tolist()):
        if k < 0:
            with lrc.adapter_sets.disable_adapters(gm):
                outs.append(call(gm, i))
        else:
            lrc.adapter_sets.set_adapter(gm, names[k])
            outs.append(call(gm, i))
    lrc.adapter_sets.set_adapter(gm, active)
    return torch.cat(outs)


@pytest.mark.parametrize("kind", list(SPECS))
def test_each_row_equals_its_adapter_alone(kind):
    gm, names = named_model(SPECS[kind])
    mgm = mixed_batch(gm)
    verify(mgm)
    x = inputs(n=7, seed=4)
    ids = torch.tensor([0, 1, -1, len(names) - 1, 1, 0, -1])
    with torch.no_grad():
        ref = alone(gm, names, ids, lambda g, i: g(x[i:i + 1]))
        got_buf = mgm(x, ids)  # no grad: the stacked capacity buffers
    got_live = mgm(x, ids)  # grad enabled: stacks built from the adapters' parameters
    torch.testing.assert_close(got_buf, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_live.detach(), ref, rtol=0, atol=1e-5)
    assert (ref[0] - ref[1]).abs().max() > 1e-3 and (ref[2] - make_mlp()(x[2])).abs().max() < 1e-6


def test_lora_matches_peft_adapter_names():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(make_mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"]))
    gm = lrc.transform(make_mlp(), "fc*:lora(r=4, alpha=8)", example_inputs=(inputs(),))
    cfgs = {"b": (2, 3), "c": (6, 6)}
    for n, (r, a) in cfgs.items():
        pm.add_adapter(n, peft.LoraConfig(r=r, lora_alpha=a, target_modules=["fc1", "fc2", "fc3"]))
        lrc.adapter_sets.add_adapter(gm, n, f"fc*:lora(r={r}, alpha={a})")
    torch.manual_seed(1)
    with torch.no_grad():
        for n in ("default", *cfgs):
            lrc.adapter_sets.set_adapter(gm, n)
            for site, mod in lrc.adapters(gm).items():
                lay = getattr(pm.base_model.model, site)
                lay.lora_B[n].weight.normal_(0, 0.3)
                mod.lora_A.copy_(lay.lora_A[n].weight)
                mod.lora_B.copy_(lay.lora_B[n].weight)
    lrc.adapter_sets.set_adapter(gm, "default")
    mgm = mixed_batch(gm, ["default", "b", "c"])
    rows = ["c", "default", "__base__", "b", "b", "c", "__base__", "default"]
    x = inputs(n=len(rows), seed=2)
    pm.eval()
    with torch.no_grad():
        ref = pm(x, adapter_names=rows)
        got = mgm(x, adapter_ids(mgm, rows))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "vera", "mixed"])
def test_mixed_training_gives_each_adapter_its_own_gradients(kind):
    gm, names = named_model(SPECS[kind])
    mgm = mixed_batch(gm)
    x, t = inputs(n=8, seed=5), torch.randn(8, 10, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([1, 0, -1, len(names) - 1, 0, 1, len(names) - 1, -1])
    loss = lambda y, rows: (y - t[rows]).pow(2).sum()  # noqa: E731 - sum over rows: each row's own term
    loss(mgm(x, ids), slice(None)).backward()
    mixed_grads = {n: {k: p.grad.clone() for k, p in _params(gm, n)} for n in names}
    assert all(g.abs().max() > 0 for d in mixed_grads.values() for g in d.values())
    for n in names:
        for _, p in _params(gm, n):
            p.grad = None
    for k, n in enumerate(names):
        lrc.adapter_sets.set_adapter(gm, n)
        rows = (ids == k).nonzero().flatten()
        loss(gm(x[rows]), rows).backward()
        for key, p in _params(gm, n):
            torch.testing.assert_close(p.grad, mixed_grads[n][key], rtol=1e-4, atol=1e-5)


def _params(gm, name):
    from lowrank_compiler.adapter_sets.named import named_adapter_modules

    return [(f"{s}.{k}", p) for s, m in named_adapter_modules(gm, name).items() for k, p in m.named_parameters()
            if p.requires_grad or p.grad is not None]


def test_mixed_training_steps_train_every_adapter():
    gm, names = named_model(SPECS["mixed"])
    mgm = mixed_batch(gm)
    lrc.adapter_sets.set_adapter(gm, names[1])  # switching the source's active set does not freeze the mixed graph's
    lrc.adapter_sets.set_adapter(gm, names[0])
    before = {n: {k: p.detach().clone() for k, p in _params(gm, n)} for n in names}
    assert all(p.requires_grad for n in names for _, p in _params(gm, n))
    opt = torch.optim.SGD([p for p in mgm.parameters() if p.requires_grad], lr=0.05)
    mgm.train()
    ids = torch.tensor([0, 1, 2, -1, 0, 1])
    for step in range(2):
        mgm(inputs(seed=step), ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    mgm.eval()
    for n in names:
        assert any((p - before[n][k]).abs().max() > 0 for k, p in _params(gm, n))
    x = inputs(n=4, seed=8)
    with torch.no_grad():  # the buffers follow the trained parameters
        torch.testing.assert_close(mgm(x, torch.tensor([2, 1, 0, -1])),
                                   alone(gm, names, torch.tensor([2, 1, 0, -1]), lambda g, i: g(x[i:i + 1])),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_kind", ["bert", "gpt2"])
def test_hf_models_each_row(model_kind):
    specs = {"bert": ["attention.self.*:lora(r=4)", "attention.self.*:dora(r=2, dropout=0.0)",
                      "attention.self.*:vera(r=4)"],
             "gpt2": ["attn.c_attn:lora(r=4)", "attn.c_attn:dora(r=2, dropout=0.0)", "attn.c_attn:vera(r=4)"]}
    ids_in = example_ids(batch=4, seq=6)
    args = (ids_in, torch.ones_like(ids_in)) if model_kind == "bert" else (ids_in,)
    gm, names = named_model(specs[model_kind], make_hf(model_kind), args)
    mgm = mixed_batch(gm)
    verify(mgm)
    sel = torch.tensor([2, -1, 0, 1])
    with torch.no_grad():
        ref = alone(gm, names, sel, lambda g, i: hidden(g(*(a[i:i + 1] for a in args))))
        got = hidden(mgm(*args, sel))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_compiled_matches_and_never_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    gm, names = named_model(SPECS["mixed"])  # LoRA, DoRA and VeRA slots
    mgm = mixed_batch(gm, capacity=4, rank=8)
    cnt = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    cmp = lrc.compile(mgm, backend=cnt)
    x = inputs(n=5, seed=3)
    ids = torch.tensor([1, 0, -1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(cmp(x, ids), alone(gm, names, ids, lambda g, i: g(x[i:i + 1])), rtol=0, atol=1e-5)
        # swap: new values in an adapter; other ids; a new adapter added into a free slot
        lrc.adapter_sets.set_adapter(gm, "a1")
        randomize(gm, seed=9)
        lrc.adapter_sets.set_adapter(gm, "default")
        lrc.adapter_sets.add_adapter(gm, "new", "fc*:lora(r=8, alpha=4)")
        lrc.adapter_sets.set_adapter(gm, "new")
        randomize(gm, seed=10)
        lrc.adapter_sets.set_adapter(gm, "default")
        assert mixed_add(mgm, gm, "new") == 3
        refresh(mgm)
        ids2 = torch.tensor([3, 2, 1, -1, 3])
        names2 = names + ["new"]
        torch.testing.assert_close(cmp(x, ids2), alone(gm, names2, ids2, lambda g, i: g(x[i:i + 1])),
                                   rtol=0, atol=1e-5)
    assert cnt.frame_count == 1, f"recompiled: {cnt.frame_count} frames"


def test_errors_name_the_problem():
    gm, names = named_model(SPECS["lora"])
    mgm = mixed_batch(gm)
    with torch.no_grad(), pytest.raises(lrc.LrcError, match=r"adapter_ids must be in \[-1, 3\)"):
        mgm(inputs(n=2), torch.tensor([0, 3]))
    with pytest.raises(lrc.LrcError, match="unknown adapter names"):
        adapter_ids(mgm, ["default", "zzz"])
    with pytest.raises(lrc.LrcError, match="capacity=1"):
        mixed_batch(gm, capacity=1)
    with pytest.raises(lrc.LrcError, match="full"):
        mixed_add(mgm, gm, "a1")
    dl = lrc.transform(make_mlp(), "fc*:delta_lora(r=4)", example_inputs=(inputs(),))
    with pytest.raises(lrc.LrcError, match="changes the base weight"):
        mixed_batch(dl)


def test_one_ort_run_serves_a_mixed_batch_and_new_adapters_need_no_reexport(tmp_path):
    pytest.importorskip("onnxruntime")
    from lowrank_compiler.backends.onnx.adapters import write_onnx_adapter
    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.mixed import export_mixed_onnx, mixed_feeds

    specs = ["attention.self.*:lora(r=4)", "attention.self.*:dora(r=2, dropout=0.0)", "attention.self.*:vera(r=4)"]
    ids_in = example_ids(batch=2, seq=6)
    gm, names = named_model(specs, make_hf("bert"), (ids_in, torch.ones_like(ids_in)))
    mgm = mixed_batch(gm, capacity=5, rank=8)
    rep = export_mixed_onnx(mgm, tmp_path / "mixed.onnx")
    assert rep["max_abs_diff"] < 1e-5 and "adapter_ids" in rep["inputs"]
    sess = session(tmp_path / "mixed.onnx", providers="cpu")
    x = example_ids(batch=5, seq=7, seed=3)  # other batch and sequence sizes than the export's
    mask = torch.ones_like(x)
    sel = torch.tensor([2, -1, 0, 1, 2])

    def ref(names_now, sel):
        with torch.no_grad():
            return alone(gm, names_now, sel, lambda g, i: hidden(g(x[i:i + 1], mask[i:i + 1]))).numpy()

    got = sess({"input_ids": x, "attention_mask": mask, "adapter_ids": sel})[0]
    assert abs(got - ref(names, sel)).max() < 1e-5
    # a new adapter (other rank, other method) goes into a free slot: new values for the same inputs
    lrc.adapter_sets.add_adapter(gm, "late", "attention.self.*:lora(r=8, alpha=2)")
    lrc.adapter_sets.set_adapter(gm, "late")
    randomize(gm, seed=11)
    lrc.adapter_sets.set_adapter(gm, "default")
    mixed_add(mgm, gm, "late")
    sel2 = torch.tensor([3, 0, -1, 3, 1])
    feeds = {"input_ids": x, "attention_mask": mask, "adapter_ids": sel2}
    got = sess({**feeds, **mixed_feeds(mgm)})[0]
    want = ref(names + ["late"], sel2)
    assert abs(got - want).max() < 1e-5
    import onnxruntime as ort

    write_onnx_adapter(mixed_feeds(mgm), tmp_path / "stack.onnx_adapter")  # or as an ORT adapter file
    la = ort.LoraAdapter()
    la.Load(str(tmp_path / "stack.onnx_adapter"))
    ro = ort.RunOptions()
    ro.add_active_adapter(la)
    got = sess.session.run(None, {k: v.numpy() for k, v in feeds.items()}, ro)[0]
    assert abs(got - want).max() < 1e-5


def test_loraga_base_offset_is_shared_and_minus_one_is_the_original_model():
    data = [(inputs(seed=20 + i),) for i in range(2)]
    gm = lrc.transform(make_mlp(), "fc*:loraga(r=4, alpha=8)", example_inputs=(inputs(),), data=data,
                       loss_fn=lambda out, batch: out.pow(2).mean(), progress=False)
    lrc.adapter_sets.add_adapter(gm, "b", "fc*:lora(r=2, alpha=4)")
    lrc.adapter_sets.set_adapter(gm, "b")
    randomize(gm, seed=3)
    lrc.adapter_sets.set_adapter(gm, "default")
    mgm = mixed_batch(gm)
    verify(mgm)
    x, ids = inputs(n=5, seed=9), torch.tensor([0, 1, -1, 1, 0])
    with torch.no_grad():
        ref = alone(gm, ["default", "b"], ids, lambda g, i: g(x[i:i + 1]))
        ref[2] = make_mlp()(x[2])  # −1: the original base, not LoRA-GA's moved one
        torch.testing.assert_close(mgm(x, ids), ref, rtol=0, atol=1e-5)
        w = gm.get_parameter("fc1.weight")
        assert (w - make_mlp().fc1.weight).abs().max() > 1e-4  # the source graph keeps its moved base
