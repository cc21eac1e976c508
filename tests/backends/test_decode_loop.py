"""lrc's ORT greedy loop (``ort_generate``) on a hand-built decoder graph in a real ONNX Runtime session.

The graph follows the decode-graph contract (``input_ids``, ``attention_mask``, ``position_ids``,
``past.0.key/value`` in; ``logits``, ``present.0.key/value`` out) with a LoRA pair as overridable inputs
(r=0 defaults), and computes something a test can state in one line: the next token is
``(last token + 1 + n_past_tokens_cached_as_ones) % V`` without the adapter, ``+ 2`` with it. So the tokens
prove that each step feeds the previous step's present back as past (the cache length enters the
logits) and that the adapter is the one asked for in each call, switched between calls.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowrank_compiler.backends.onnx.adapters import write_onnx_adapter
from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.backends.onnx.generate import ort_generate
from lowrank_compiler.errors import ExportError

V = 11  # vocabulary
A_IN, B_IN = "m.lora_A.weight", "m.lora_B.weight"


def _toy_decoder(path) -> None:
    """logits[b, s] = onehot(id + 1 + past_len) + onehot(id + 1 + past_len) @ A @ B (ids mod V)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    shift = np.stack([np.roll(np.eye(V, dtype=np.float32), k, axis=1) for k in range(64)])  # [past_len, V, V]
    nodes = [
        helper.make_node("Shape", ["past.0.key"], ["plen"], start=2, end=3),           # [1]: cached tokens
        helper.make_node("Squeeze", ["plen"], ["plen0"]),
        helper.make_node("Gather", ["shift", "plen0"], ["table"]),                       # [V, V] = roll(I, p)
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),                         # onehot(id + 1)
        helper.make_node("MatMul", ["e", "table"], ["h"]),                               # onehot(id + 1 + p)
        helper.make_node("MatMul", ["h", A_IN], ["ha"]),
        helper.make_node("MatMul", ["ha", B_IN], ["delta"]),
        helper.make_node("Add", ["h", "delta"], ["logits"]),
        helper.make_node("Unsqueeze", ["input_ids", "axes13"], ["ids4"]),               # [b, 1, s, 1]
        helper.make_node("Cast", ["ids4"], ["k1"], to=f),
        helper.make_node("Concat", ["k1", "k1"], ["k"], axis=3),                         # [b, 1, s, 2]
        helper.make_node("Concat", ["past.0.key", "k"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past.0.value", "k"], ["present.0.value"], axis=2),
    ]
    kv = ["batch", 1, "past", 2]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("past.0.key", f, kv), helper.make_tensor_value_info("past.0.value", f, kv),
              helper.make_tensor_value_info(A_IN, f, [V, "m.lora_r"]), helper.make_tensor_value_info(B_IN, f, ["m.lora_r", V])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch", "seq", V]),
               helper.make_tensor_value_info("present.0.key", f, ["batch", 1, "total", 2]),
               helper.make_tensor_value_info("present.0.value", f, ["batch", 1, "total", 2])]
    inits = [numpy_helper.from_array(np.roll(np.eye(V, dtype=np.float32), 1, axis=1), "emb"),
             numpy_helper.from_array(shift, "shift"), numpy_helper.from_array(np.array([1, 3], np.int64), "axes13"),
             numpy_helper.from_array(np.zeros((V, 0), np.float32), A_IN),
             numpy_helper.from_array(np.zeros((0, V), np.float32), B_IN)]
    model = helper.make_model(helper.make_graph(nodes, "toy", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _expected(prompt: np.ndarray, new: int, bump: int) -> np.ndarray:
    """Each step: next = last + 1 + (tokens cached before this step) + bump (mod V), the formula above."""
    rows = []
    for row in prompt:
        seq, cached = list(row), 0
        step = list(row)
        for _ in range(new):
            seq.append((step[-1] + 1 + cached + bump) % V)
            cached += len(step)
            step = [seq[-1]]
        rows.append(seq)
    return np.asarray(rows, np.int64)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    _toy_decoder(d / "toy.onnx")
    two_b = 2 * np.roll(np.eye(V, dtype=np.float32), 1, axis=1)  # h @ I @ 2·roll(I, 1) = 2·onehot(next + 1)
    write_onnx_adapter({A_IN: np.eye(V, dtype=np.float32), B_IN: two_b}, d / "plus1.onnx_adapter")
    write_onnx_adapter({A_IN: np.eye(V, dtype=np.float32)[:, :1], B_IN: np.zeros((1, V), np.float32)},
                       d / "zero.onnx_adapter")
    return session(d / "toy.onnx", providers="cpu"), d


def test_loop_feeds_the_cache_back_and_switches_adapters_per_call(toy):
    sess, d = toy
    prompt = np.array([[3, 4, 5], [0, 9, 2]], np.int64)
    base = _expected(prompt, 6, 0)
    assert np.array_equal(ort_generate(sess, prompt, max_new_tokens=6), base)
    for name, bump in (("plus1", 1), ("zero", 0), ("plus1", 1), (None, 0)):
        got = ort_generate(sess, prompt, max_new_tokens=6, adapter=None if name is None else d / f"{name}.onnx_adapter")
        assert np.array_equal(got, _expected(prompt, 6, bump)), name
    assert not np.array_equal(_expected(prompt, 6, 1), base)  # the adapter changes the tokens: the check can fail


def test_mask_buffer_growth_and_left_padding(toy, monkeypatch):
    """The attention mask is a view of a row buffer that grows every ``GROW`` tokens (2 here): every step
    feeds the prompt's mask plus a one per generated token, positions that count the mask's ones (HF's
    ``generate`` for a left-padded row), and the tokens stay the formula's."""
    from lowrank_compiler.backends.onnx import decode_steps

    sess, d = toy
    fed = []
    real = decode_steps.step_runner

    def recording(s, adapter):
        run, ro = real(s, adapter)
        return (lambda names, feeds, opts: fed.append({k: np.array(feeds[k]) for k in ("attention_mask",
                "position_ids")}) or run(names, feeds, opts)), ro

    monkeypatch.setattr(decode_steps, "GROW", 2)
    monkeypatch.setattr(decode_steps, "step_runner", recording)
    prompt, mask = np.array([[3, 4, 5], [0, 9, 2]], np.int64), np.array([[1, 1, 1], [0, 1, 1]], np.int64)
    for adapter, bump in ((None, 0), (d / "plus1.onnx_adapter", 1)):
        fed.clear()
        got = ort_generate(sess, prompt, mask, max_new_tokens=9, adapter=adapter)
        assert np.array_equal(got, _expected(prompt, 9, bump))
        assert len(fed) == 9
        for k, f in enumerate(fed):
            want_mask = np.concatenate([mask, np.ones((2, k), np.int64)], axis=1)
            want_pos = np.clip(np.cumsum(want_mask, -1) - 1, 0, None)[:, -1 if k else 0:]
            assert np.array_equal(f["attention_mask"], want_mask), k
            assert np.array_equal(f["position_ids"], want_pos), k


def test_loop_stops_rows_at_eos_and_pads(toy):
    sess, _ = toy
    prompt = np.array([[3, 4, 5]], np.int64)
    want = _expected(prompt, 6, 0)
    eos = int(want[0, 4])  # the second new token
    got = ort_generate(sess, prompt, max_new_tokens=6, eos_token_id=eos)
    assert np.array_equal(got, want[:, :5])


def test_loop_refuses_a_bare_inference_session(toy):
    import onnxruntime as ort

    _, d = toy
    raw = ort.InferenceSession(str(d / "toy.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(ExportError, match=r"backends\.onnx\.export\.session\(\)"):
        ort_generate(raw, np.array([[1, 2]], np.int64), max_new_tokens=2)


@pytest.mark.slow  # ~30 s on the shared machine: a subprocess importing torch, transformers and lrc
def test_bench_decode_refuses_cuda_without_a_gpu():
    """``benchmarks/bench_decode.py --device cuda`` on a machine without CUDA: one line on stderr, exit 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_decode.py"), "--device", "cuda"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-500:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--device cuda refused" in lines[0] and "--device cpu" in lines[0], p.stderr
