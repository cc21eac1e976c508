"""One decode step structure for every ORT loop over a decode graph (``ort_generate``, the quantized gate).

:func:`decode_steps` is a generator: it runs the prompt (prefill) and yields the last-position logits
[batch, vocab]; each ``send(next_ids)`` runs one more step and yields that step's logits. The KV cache
is not copied: ``session.run`` (ORT 1.32) returns each output as a numpy array over ORT's own buffer,
and feeding it back as the next ``past.*`` wraps the same memory. Measured on the shared 2-core host
(hidden 512 x 4 layers, 1 thread): ``run_with_ort_values`` (OrtValues in and out, which also honours the
adapters in ``RunOptions``) and IOBinding (which ignores them) were no faster than ``run``; the Python
work per step (feeds dict, argmax, one small concatenate) is ~15 µs of a ~3.7 ms step.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import numpy as np

from lowrank_compiler.errors import ExportError


def step_runner(sess: Any, adapter: str | os.PathLike | None) -> tuple[Any, Any]:
    """``(run, run_options)``: ``run(output_names, {name: array}, run_options) -> [array]`` of the
    ORT session inside ``sess`` (an :class:`~lowrank_compiler.backends.onnx.export.OrtSession`); the adapter
    is looked up once per generation (resolving its path costs ~35 µs, 4% of a small model's decode step)."""
    inner = getattr(sess, "session", None)
    if inner is None or not hasattr(sess, "run_options"):
        raise ExportError(f"ort_generate needs a session from backends.onnx.export.session(), not {type(sess).__name__}")
    return inner.run, sess.run_options(adapter)


def decode_steps(sess: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                 adapter: str | os.PathLike | None = None) -> Generator[np.ndarray, np.ndarray, None]:
    """Yield last-position logits [batch, vocab] (float32) for the prompt, then once per sent token batch.

    ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, seq] int64 (left padding allowed: positions
    count the mask's ones, as HF's ``generate``); ``send(ids)`` takes the next tokens [batch] int64.

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
    b = input_ids.shape[0]
    feeds = {i.name: np.zeros((b, int(i.shape[1]), 0, int(i.shape[3])), np.float32) for i in pasts}
    with_pos = "position_ids" in names
    mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    ones = np.ones((b, 1), np.int64)
    while True:
        feeds["input_ids"], feeds["attention_mask"] = ids, mask
        if with_pos:
            feeds["position_ids"] = pos
        res = run(out_names, feeds, run_options)
        for k, name in carry:
            feeds[name] = res[k]
        nxt = yield np.array(res[0][:, -1])  # a copy: the caller may keep it past the next step
        ids = np.asarray(nxt, dtype=np.int64).reshape(b, 1)
        mask = np.concatenate([mask, ones], axis=1)
        pos = pos[:, -1:] + 1
