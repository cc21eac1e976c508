"""One decode step structure for every ORT loop over a decode graph (``ort_generate``, the quantized gate).

:func:`decode_steps` is a generator: it runs the prompt (prefill) and yields the last-position logits
[batch, vocab]; each ``send(next_ids)`` runs one more step and yields that step's logits. The KV cache
is not copied: ``session.run`` (ORT 1.32) returns each output as a numpy array over ORT's own buffer,
and feeding it back as the next ``past.*`` wraps the same memory (``run_with_ort_values`` and IOBinding
measured no faster; IOBinding also ignores the adapters in ``RunOptions``).

What the Python side costs is not the work but the cold caches: after a ~4 ms ORT run has streamed the
weights through them, each numpy call of the loop took 10-40 µs (an argmax 11, a 2000-float copy 30, a
concatenate 44; 1-2 µs each in a hot loop), ~110 µs per step in all, 2.5% of a hidden-512 x 4-layer step
at batch 1. So a step makes as few calls as it can: the mask is a view of a preallocated row buffer,
positions advance in place, logits are yielded as a view (no copy), and ORT's own ``_sess.run`` is called
directly (the Python wrapper's feed checks make ~40 calls; ORT checks the feeds again in C++).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import numpy as np

from lowrank_compiler.errors import ExportError

GROW = 64  # attention-mask columns the row buffer gains when full


def step_runner(sess: Any, adapter: str | os.PathLike | None) -> tuple[Any, Any]:
    """``(run, run_options)``: ``run(output_names, {name: array}, run_options) -> [array]`` of the ORT session
    inside ``sess`` (an :class:`~lowrank_compiler.backends.onnx.export.OrtSession`); the adapter is looked up
    once per generation (resolving its path costs ~35 µs, 4% of a small model's decode step)."""
    inner = getattr(sess, "session", None)
    if inner is None or not hasattr(sess, "run_options"):
        raise ExportError(f"ort_generate needs a session from backends.onnx.export.session(), not {type(sess).__name__}")
    c_sess = getattr(inner, "_sess", None)  # the pybind session: no per-call Python feed checks (docstring)
    return (c_sess.run if hasattr(c_sess, "run") else inner.run), sess.run_options(adapter)


def decode_steps(sess: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                 adapter: str | os.PathLike | None = None) -> Generator[np.ndarray, np.ndarray, None]:
    """Yield last-position logits [batch, vocab] (float32) for the prompt, then once per sent token batch.

    ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, seq] int64 (left padding allowed: positions
    count the mask's ones, as HF's ``generate``); ``send(ids)`` takes the next tokens [batch] int64. Each
    yielded array is a view of that step's ORT output (it keeps it alive; no copy is made).

    Raises:
        ExportError: ``sess`` is not an lrc session, or its graph is not a decode graph.
    """
    inputs = sess.get_inputs()
    names = {i.name for i in inputs}
    pasts = [i for i in inputs if i.name.startswith("past.")]
    if "input_ids" not in names or not pasts:
        raise ExportError("this ONNX model has no input_ids / past.* inputs; export the causal LM (its lrc file, "
                          "HF directory or live model) again: `lrc export MODEL -o lm.onnx`")
    run, run_options = step_runner(sess, adapter)
    out_names = [o.name for o in sess.session.get_outputs()]
    carry = [(k, n.replace("present.", "past.")) for k, n in enumerate(out_names) if n.startswith("present.")]
    b, total = input_ids.shape
    feeds = {i.name: np.zeros((b, int(i.shape[1]), 0, int(i.shape[3])), np.float32) for i in pasts}
    with_pos = "position_ids" in names
    mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    feeds["input_ids"] = np.ascontiguousarray(input_ids, dtype=np.int64)
    feeds["attention_mask"] = mask
    if with_pos:
        feeds["position_ids"] = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    grow = GROW
    buf = np.ones((b, total + grow), np.int64)
    buf[:, :total] = mask
    pos = feeds["position_ids"][:, -1:] + 1 if with_pos else None
    while True:
        res = run(out_names, feeds, run_options)
        for k, name in carry:
            feeds[name] = res[k]
        nxt = yield res[0][:, -1]
        total += 1
        if total > buf.shape[1]:
            buf = np.concatenate([buf, np.ones((b, grow), np.int64)], axis=1)
        feeds["input_ids"] = np.asarray(nxt, dtype=np.int64).reshape(b, 1)
        feeds["attention_mask"] = buf[:, :total]  # contiguous at batch 1; ORT copies the view otherwise
        if with_pos:
            feeds["position_ids"] = pos
            pos = pos + 1
