"""Numerics check for a fused graph: ONNX Runtime outputs of fused vs unfused on sample inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowrank_compiler.errors import ExportError

_NP = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}


def overridable(model: Any) -> dict[str, list[object]]:
    """``{name: dims}`` of the graph inputs that also have an initializer (e.g. LoRA A/B: ORT adapters)."""
    inits = {i.name for i in model.graph.initializer}
    return {i.name: _dims(i) for i in model.graph.input if i.name in inits}


def _dims(vi: Any) -> list[object]:
    return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
            for d in vi.type.tensor_type.shape.dim]


def _index_bounds(model: Any) -> dict[str, int]:
    """Graph inputs used as Gather indices into an initializer table: their exclusive upper bound."""
    sizes = {i.name: i.dims[0] for i in model.graph.initializer if len(i.dims)}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in sizes:
            out[n.input[1]] = min(out.get(n.input[1], 1 << 62), int(sizes[n.input[0]]))
    return out


def sample_feeds(model: Any, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for the required inputs (symbolic dims from ``dims``, default batch 2, others 16).

    Integer inputs that index an embedding table get ids below its size; other integer inputs (masks)
    are ones, with the second half of the last row zeroed when the input is named like a mask.
    """
    rng = np.random.default_rng(seed)
    dims = {"batch": 2, **(dims or {})}
    bounds = _index_bounds(model)
    skip = set(overridable(model))
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in skip:
            continue
        elem = vi.type.tensor_type.elem_type
        if elem not in _NP:
            raise ExportError(f"cannot make a sample for input {vi.name!r} (element type {elem}); pass feeds=")
        shape = []
        for d in _dims(vi):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and (d in dims or d.isidentifier()):
                shape.append(dims.get(d, 16))
            else:
                raise ExportError(f"input {vi.name!r} has a computed dimension {d!r}; pass feeds= to verify the fusions")
        dt = _NP[elem]
        if np.issubdtype(dt, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
        elif vi.name in bounds:
            feeds[vi.name] = rng.integers(0, bounds[vi.name], shape).astype(dt)
        else:
            arr = np.ones(shape, dt)
            if "mask" in vi.name and arr.ndim == 2 and shape[1] > 1:
                arr[-1, shape[1] // 2:] = 0
            feeds[vi.name] = arr
    return feeds


def probe_adapter(model: Any, rank: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    """Random non-zero values for every overridable input with a symbolic (rank) dim: a LoRA adapter
    that moves the outputs, so a fusion that lost the adapter path is caught."""
    rng = np.random.default_rng(seed)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    out = {}
    for name, dims in overridable(model).items():
        if any(isinstance(d, str) for d in dims):
            shape = [rank if isinstance(d, str) else d for d in dims]
            out[name] = (0.1 * rng.standard_normal(shape)).astype(_NP.get(inits[name], np.float32))
    return out


def session(model_bytes: bytes, threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # the expected "initializer appears in graph inputs" warnings
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def run_all(sess: Any, feed_sets: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    return [sess.run(None, f) for f in feed_sets]


def drift(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> tuple[float, float]:
    """(max abs difference, max |ref|) over every float output of every feed set."""
    diff, scale = 0.0, 0.0
    for rs, gs in zip(ref, got):
        for r, g in zip(rs, gs):
            if r.shape != g.shape:
                return float("inf"), 1.0
            if r.size and np.issubdtype(r.dtype, np.floating):
                d = np.abs(r.astype(np.float64) - g.astype(np.float64))
                diff = max(diff, float(np.nan_to_num(d, nan=np.inf).max()))
                scale = max(scale, float(np.nanmax(np.abs(r))))
            elif r.size and not np.array_equal(r, g):
                return float("inf"), 1.0
    return diff, scale
