"""SmoothQuant-style smoothing before int8: the LayerNorm fold is exact, and smoothing buys int8 accuracy.

Reference: a numpy LayerNorm·W formula. (The other folds, on a BERT export: tests/test_quantize.py.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowrank_compiler.backends.onnx import export as lo
from lowrank_compiler.backends.onnx.quantize import output_error, quantize_onnx
from lowrank_compiler.backends.onnx.smoothquant import smooth


def _ln_model(path, gamma: np.ndarray, beta: np.ndarray, ws: list[np.ndarray]) -> None:
    """x -> LayerNormalization -> one MatMul per weight (the LayerNorm read only by them: a pre-LN block)."""
    c = gamma.shape[0]
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1, epsilon=1e-5)]
    outs = []
    for i, w in enumerate(ws):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["ln", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "s", w.shape[1]]))
    g = helper.make_graph(nodes, "ln_mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", c])],
                          outs, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _ln_ref(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, ws: list[np.ndarray]) -> list[np.ndarray]:
    x = x.astype(np.float64)
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    return [h @ w for w in ws]


def test_layernorm_fold_is_exact_and_smoothing_buys_int8_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    c = 64
    gamma = np.ones(c, np.float32)
    gamma[[5, 40]] = 25.0  # two outlier channels, as in BERT's residual stream
    beta = (0.1 * rng.standard_normal(c)).astype(np.float32)
    ws = [(rng.standard_normal((c, n)) / np.sqrt(c)).astype(np.float32) for n in (48, 32)]
    _ln_model(tmp_path / "m.onnx", gamma, beta, ws)
    samples = [{"x": rng.standard_normal((4, 16, c)).astype(np.float32)} for _ in range(2)]
    test = {"x": rng.standard_normal((4, 16, c)).astype(np.float32)}  # held out
    ref = _ln_ref(test["x"], gamma, beta, ws)

    model = onnx.load(str(tmp_path / "m.onnx"))
    done = smooth(model, ["mm0", "mm1"], samples, alpha=0.5, outliers=0)
    assert [v["how"] for v in done.values()] == ["layernorm"]
    assert sum(n.op_type == "Mul" for n in model.graph.node) == 0  # folded, nothing inserted
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not np.allclose(inits["gamma"], gamma)  # the fold really moved the scales
    onnx.save(model, str(tmp_path / "s.onnx"))
    got = lo.session(tmp_path / "s.onnx", providers="cpu")(test)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)

    errs = {}
    for sm in (False, True):
        rep = quantize_onnx(tmp_path / "m.onnx", tmp_path / f"q{sm}.onnx", "int8", samples=samples, smooth=sm,
                            search=False, force=True)
        assert rep["quantized"] == 2
        errs[sm] = 1 - output_error(ref, lo.session(tmp_path / f"q{sm}.onnx", providers="cpu")(test))[1]
    assert errs[True] < errs[False] / 3, errs  # measured on inputs the smoothing never saw
