"""Fast checks of the ONNX lowering on a small MLP, the separate pass, and provider selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.mlp import UpDown as MLP

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx import export as lo
from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import adapter_nodes
from lowrank_compiler.passes.separate import separate


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = lrc.transform(MLP().eval(), "up:lora(r=2, alpha=4); down:lora(r=3)", (x,))
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.5)
    return gm.eval(), x


def _ref_separate(gm, x):
    """The LoRA formula computed by hand from the adapters' tensors (independent of the pass)."""
    ad = lrc.adapters(gm)
    up, down = gm.get_submodule("up"), gm.get_submodule("down")
    h = torch.relu(x @ up.weight.T + up.bias + ad["up"].scaling * (x @ ad["up"].lora_A.T) @ ad["up"].lora_B.T)
    return h @ down.weight.T + ad["down"].scaling * (h @ ad["down"].lora_A.T) @ ad["down"].lora_B.T


def test_separate_pass_rewrites_and_is_idempotent(mlp):
    gm, x = mlp
    res = separate(gm)
    assert res.modified and not adapter_nodes(res.gm) and adapter_nodes(gm)  # gm itself untouched
    assert res.gm.get_parameter("up.adapter.lora_A").shape == (8, 2)
    assert res.gm.get_parameter("down.adapter.lora_B").shape == (3, 8)
    with torch.no_grad():
        torch.testing.assert_close(res.gm(x), _ref_separate(gm, x))
    again = separate(res.gm)
    assert not again.modified
    seeded = separate(gm, placeholder_seed=0).gm
    a1, a2 = seeded.get_parameter("up.adapter.lora_A"), seeded.get_parameter("down.adapter.lora_A")
    assert not torch.equal(a1, gm.get_submodule("up.adapter").lora_A.detach().T) and a1.min() >= 0.5
    assert a2.shape == (16, 3)


def test_separate_pass_unmerges_merged_adapters(mlp):
    gm, x = mlp
    with torch.no_grad():
        ref = gm(x)
    lrc.merge(gm, keep_adapters=True)
    out = separate(gm).gm
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref)
        torch.testing.assert_close(out.get_parameter("up.weight"), torch.nn.Parameter(gm.get_parameter("up.weight")
                                   - lrc.adapters(gm)["up"].delta_weight(None)))


def _dora_by_hand(lin, ad, x):
    """DoRA's output from the paper's formula: m ⊙ (W + s·B A) / ‖W + s·B A‖_row, then x·W'ᵀ + b."""
    v = lin.weight + ad.scaling * ad.lora_B @ ad.lora_A
    w = ad.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)
    return x @ w.T + (lin.bias if lin.bias is not None else 0)


@pytest.mark.parametrize("method", ["dora", "dora_fa"])
def test_dora_separate_gain_input_base_and_adapter(tmp_path, method):
    """A DoRA site exports as g ⊙ (W x + x A B) + b with the gain an overridable [d_out] input (default ones):
    no adapter is the base MLP, the .onnx_adapter (A, B, g) is the DoRA model; a LoRA site next to it."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = MLP().eval()
    gm = lrc.transform(model, f"up:{method}(r=2, alpha=4, dropout=0.0); down:lora(r=3)", (x,)).eval()
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.5)
        lrc.adapters(gm)["up"].lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 16))
        ad, up, down = lrc.adapters(gm), gm.get_submodule("up"), gm.get_submodule("down")
        h = torch.relu(_dora_by_hand(up, ad["up"], x))
        want = h @ down.weight.T + ad["down"].scaling * (h @ ad["down"].lora_A.T) @ ad["down"].lora_B.T
        torch.testing.assert_close(separate(gm).gm(x), want)
        torch.testing.assert_close(separate(gm, gain_sites={"down"}).gm(x), want)  # a ones gain changes nothing
        plain = model.down(torch.relu(model.up(x)))
    rep = lrc.export(gm, tmp_path / "s.onnx")
    assert "up.dora_gain.weight" in rep["lora_inputs"] and "down.dora_gain.weight" not in rep["lora_inputs"]
    sess = lo.session(tmp_path / "s.onnx", "cpu")
    assert sess.lora_inputs()["up.dora_gain.weight"] == (16,)
    assert np.abs(sess({"x": x.numpy()})[0] - plain.numpy()).max() <= 1e-5
    got = sess({"x": x.numpy()}, adapter=tmp_path / "s.onnx_adapter")[0]
    assert np.abs(got - want.numpy()).max() <= 1e-5 and np.abs(want - plain).max() > 0.1
    lrc.merge(gm, keep_adapters=True)  # a merged DoRA: its gain is taken over the unmerged base
    with torch.no_grad():
        torch.testing.assert_close(separate(gm).gm(x), want, atol=1e-5, rtol=1e-5)


def test_small_model_merged_and_separate_onnx(mlp, tmp_path):
    gm, x = mlp
    rep = lrc.export(gm, tmp_path / "m.onnx", merge=True)
    rep_s = lrc.export(gm, tmp_path / "s.onnx")
    assert rep["max_abs_diff"] <= 1e-5 and rep_s["max_abs_diff"] <= 1e-5
    assert rep["inputs"] == ["x"] and (tmp_path / "s.onnx_adapter").is_file()
    x2 = torch.randn(3, 7, 8)
    ref = _ref_separate(gm, x2).detach().numpy()
    m, s = lo.session(tmp_path / "m.onnx", "cpu"), lo.session(tmp_path / "s.onnx", "cpu")
    assert np.abs(m({"x": x2})[0] - ref).max() <= 1e-5
    assert np.abs(s({"x": x2}, adapter=tmp_path / "s.onnx_adapter")[0] - ref).max() <= 1e-5
    # another adapter with other ranks per site (r=1 / r=5) in the same session
    other = {"up.lora_A.weight": np.random.rand(8, 1).astype(np.float32), "up.lora_B.weight": np.random.rand(1, 16).astype(np.float32),
             "down.lora_A.weight": np.random.rand(16, 5).astype(np.float32), "down.lora_B.weight": np.random.rand(5, 8).astype(np.float32)}
    lo.write_onnx_adapter(other, tmp_path / "other.onnx_adapter")
    up, down = gm.get_submodule("up"), gm.get_submodule("down")
    xn = x2.numpy()
    h = np.maximum(xn @ up.weight.detach().numpy().T + up.bias.detach().numpy()
                   + xn @ other["up.lora_A.weight"] @ other["up.lora_B.weight"], 0)
    want = h @ down.weight.detach().numpy().T + h @ other["down.lora_A.weight"] @ other["down.lora_B.weight"]
    assert np.abs(s({"x": x2}, adapter=tmp_path / "other.onnx_adapter")[0] - want).max() <= 1e-4
    assert np.abs(s({"x": x2}, adapter=tmp_path / "s.onnx_adapter")[0] - ref).max() <= 1e-5
    base = MLP().eval()
    base.load_state_dict({k: v for k, v in gm.state_dict().items() if ".adapter." not in k})
    with torch.no_grad():
        assert np.abs(s({"x": x2})[0] - base(x2).numpy()).max() <= 1e-5


class _FakeOrt:
    def __init__(self, providers):
        self.providers, self.__version__ = providers, "9.9"

    def get_available_providers(self):
        return self.providers


@pytest.mark.parametrize(("avail", "gpu", "ask", "want"), [
    (["CPUExecutionProvider"], False, "auto", ["CPUExecutionProvider"]),
    (["CPUExecutionProvider"], True, "auto", ["CPUExecutionProvider"]),  # CPU-only onnxruntime on a GPU box
    (["CUDAExecutionProvider", "CPUExecutionProvider"], False, "auto", ["CPUExecutionProvider"]),  # no GPU
    (["CUDAExecutionProvider", "CPUExecutionProvider"], True, "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], True, "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], True, "cpu", ["CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], True, ["CUDAExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_provider_selection(monkeypatch, avail, gpu, ask, want):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", _FakeOrt(avail))
    monkeypatch.setattr(lo, "_gpu_present", lambda: gpu)
    assert lo.resolve_providers(ask) == want


@pytest.mark.parametrize(("avail", "gpu", "ask", "msg"), [
    (["CPUExecutionProvider"], True, "cuda", "install the `gpu` extra, which replaces onnxruntime"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], False, "cuda", "no GPU is visible"),
    (["CPUExecutionProvider"], False, "tpu", "unknown providers 'tpu'"),
    (["CPUExecutionProvider"], False, ["TensorrtExecutionProvider"], "not available"),
])
def test_provider_errors(monkeypatch, avail, gpu, ask, msg):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", _FakeOrt(avail))
    monkeypatch.setattr(lo, "_gpu_present", lambda: gpu)
    with pytest.raises(ExportError, match=msg.replace("(", r"\(")):
        lo.resolve_providers(ask)


def test_real_onnxruntime_auto_is_cpu_here():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and lo._gpu_present():
        pytest.skip("a GPU onnxruntime is installed")
    assert lo.resolve_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ExportError, match="CUDA"):
        lo.resolve_providers("cuda")


def test_session_missing_file():
    with pytest.raises(ExportError, match="no such ONNX model file"):
        lo.session("nope.onnx")
