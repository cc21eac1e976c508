"""Numbers: NaN/inf never reach a base weight; lora_pro with SGD; merged load_adapters; spec ranges."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.mlp import _lora_pro_setup, _proj, batch, inputs, make_mlp

import lowrank_compiler as lrc
from lowrank_compiler import LrcError, SpecError
from lowrank_compiler.errors import InitError, MergeError


def _nan_batch():
    x, t = batch(0)
    x[0, 0] = math.nan
    return x, t


@pytest.mark.parametrize("spec", ["fc1:delta_lora(r=4, alpha=8, ratio=2, start=0)",
                                  "fc2:lorasc(r=2, alpha=4, cascade_every=1)"])
def test_nan_step_never_reaches_base_weight(spec, tmp_path):
    gm = lrc.transform(make_mlp(), spec, example_inputs=(inputs(),))
    site = next(iter(lrc.adapters(gm)))
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    x, t = batch(1)  # one good step first, so the base has moved once
    (gm(x) - t).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if "adapter" not in n}
    x, t = _nan_batch()
    (gm(x) - t).pow(2).mean().backward()
    with pytest.raises(MergeError, match=rf"{site}.*{spec.split(':')[1].split('(')[0]}|"
                                         rf"{spec.split(':')[1].split('(')[0]}.*{site}"):
        opt.step()
    for n, p in gm.named_parameters():
        if "adapter" not in n:
            assert torch.equal(p, before[n]), n  # no base weight changed
            assert torch.isfinite(p).all()


def test_lora_pro_nan_batch_names_the_site():
    gm = lrc.transform(make_mlp(), "fc2:lora_pro(r=4, alpha=8)", example_inputs=(inputs(),))
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-3)
    x, t = _nan_batch()
    (gm(x) - t).pow(2).mean().backward()
    with pytest.raises(LrcError, match="lora_pro at site 'fc2'.*non-finite"):
        opt.step()


def test_lora_pro_full_with_sgd_takes_sgd_steps_on_adjusted_grads():
    """SGD (no Adam moments): one step moves s·(B A) by exactly −lr · proj(G), the closed form."""
    gm, ad, G = _lora_pro_setup("full")
    A0, B0, s, lr = ad.lora_A.detach().clone(), ad.lora_B.detach().clone(), ad.scaling, 1.0
    opt = lrc.optimizer(gm, torch.optim.SGD, lr=lr)
    opt.step()
    dA, dB = (ad.lora_A.detach() - A0).double(), (ad.lora_B.detach() - B0).double()
    # first-order part of the change of s·BA: s(B0 dA + dB A0) = −lr · proj_{A0,B0}(G)
    moved = s * (B0.double() @ dA + dB @ A0.double())
    torch.testing.assert_close(moved, -lr * _proj(A0.double(), B0.double(), G.double()), rtol=1e-3, atol=1e-6)
    st = opt.state_dict()["state"]
    assert not any("lorapro_exp_avg" in v for v in st.values())  # no hidden Adam state


class _Gated(torch.nn.Module):
    """Rows whose first feature is 0 get inf/NaN activations before fc2; the loss ignores those rows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6)

    def forward(self, x):
        h = torch.relu(self.fc1(x)) / (x[:, :1] != 0)
        return self.fc2(h)


@pytest.mark.parametrize("svd", ["exact", "sketch"])
def test_loraga_nan_activation_names_the_site(svd):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    x[0, 0] = 0.0
    t = torch.randn(8, 6)

    def loss_fn(out, b):
        return (out[1:] - t[1:]).pow(2).mean()  # finite: row 0 is not in the loss

    with pytest.raises(InitError, match="fc2"):
        lrc.transform(_Gated(), f"fc2:loraga(r=2, alpha=4, svd='{svd}')", example_inputs=(x,),
                      data=[(x,)], loss_fn=loss_fn, progress=False)


def test_load_adapters_on_merged_model_is_exact(tmp_path):
    torch.manual_seed(0)
    model = make_mlp()
    gm = lrc.transform(model, "fc1:lora(r=4, alpha=8); fc2:lora(r=2)", example_inputs=(inputs(),))
    base = {n: p.detach().clone() for n, p in gm.named_parameters() if "adapter" not in n}
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.normal_()
    lrc.save_adapters(gm, tmp_path / "new.safetensors")
    want = gm(inputs()).detach()
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.normal_()  # different adapters now in the model
    lrc.merge(gm, keep_adapters=True)
    lrc.load_adapters(gm, tmp_path / "new.safetensors")
    assert all(m.merged for m in lrc.adapters(gm).values())
    torch.testing.assert_close(gm(inputs()), want, rtol=0, atol=1e-5)
    lrc.unmerge(gm)
    for n, p in gm.named_parameters():
        if "adapter" not in n:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)  # base restored within fp32 rounding


@pytest.mark.parametrize("spec", ["fc1:lora(alpha=1e308)", "fc1:vera(seed=18446744073709551616)",
                                  "fc1:lora(r=9223372036854775808)", "fc1:dora(alpha=-1e300)"])
def test_spec_values_out_of_range(spec):
    with pytest.raises(SpecError):
        lrc.transform(make_mlp(), spec, example_inputs=(inputs(),))


def test_bf16_loraga_separate_onnx_export(tmp_path):
    """LoRA-GA keeps fp32 factors on a bf16 model: the separate branch casts in and back out."""
    import onnx

    from lowrank_compiler.passes.separate import separate

    torch.manual_seed(0)
    model = _Gated().to(torch.bfloat16)
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    gm = lrc.transform(model, "fc*:loraga(r=2, alpha=4)", example_inputs=(x,), data=[(x,)],
                       loss_fn=lambda out, b: out.float().pow(2).mean(), progress=False)
    assert all(m.lora_A.dtype == torch.float32 for m in lrc.adapters(gm).values())
    with torch.no_grad():
        out, ref = separate(gm).gm(x), gm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # ONNX Runtime's CPU provider has no bf16 kernels: the export computes in fp32 over the bf16 weights (upcast
    # exactly) and is validated in ORT against the model computed in fp32 (it used to fail with a Float/BFloat16
    # matmul mismatch, then to write a bf16 graph ORT could not run)
    rep = lrc.export(gm, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(m)
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert rep["source_dtype"] == "bfloat16" and rep["max_abs_diff"] < 1e-5
    assert len(rep["lora_inputs"]) == 4
