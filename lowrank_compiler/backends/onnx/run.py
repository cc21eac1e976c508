"""``lrc run``: a smoke run of an exported ONNX model in ONNX Runtime, with and without adapters."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.backends.onnx.generate import ort_generate
from lowrank_compiler.errors import ExportError

_NP = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
       "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_}


def vocab_size(model_path: str | Path, input_name: str) -> int | None:
    """Rows of the embedding table that ``input_name`` indexes (a Gather on an initializer), if any."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == input_name and n.input[0] in inits:
            return int(inits[n.input[0]][0])
    return None


def sample_inputs(sess: Any, model_path: str | Path, shape: tuple[int, int], vocab: int | None = None,
                  given: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every session input: ``given`` ones, masks of ones, token types of zeros, random ids/floats."""
    rng = np.random.default_rng(seed)
    feeds = dict(given or {})
    for i in sess.get_inputs():
        if i.name in feeds:
            continue
        dt = _NP.get(i.type, np.float32)
        dims = [d if isinstance(d, int) else None for d in i.shape]
        full = [shape[k] if k < 2 and d is None else (d if d is not None else 1) for k, d in enumerate(dims)]
        if np.issubdtype(dt, np.integer):
            if "mask" in i.name:
                feeds[i.name] = np.ones(full, dt)
            elif "type" in i.name:
                feeds[i.name] = np.zeros(full, dt)
            else:
                high = vocab or vocab_size(model_path, i.name) or 100
                feeds[i.name] = rng.integers(0, high, full).astype(dt)
        else:
            feeds[i.name] = rng.standard_normal(full).astype(dt)
    return feeds


def check_feeds(sess: Any, given: dict[str, np.ndarray]) -> None:
    """Each given input names a model input and has its dtype and rank (and any fixed sizes)."""
    spec = {i.name: i for i in sess.get_inputs()}
    for name, arr in given.items():
        if name not in spec:
            raise ExportError(f"--input {name}: the model has no input {name!r}; inputs: {', '.join(spec)}")
        want, dims = _NP.get(spec[name].type), list(spec[name].shape)
        if want is not None and arr.dtype != want:
            raise ExportError(f"--input {name}: dtype {arr.dtype}, the model takes {np.dtype(want)}")
        if arr.ndim != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, arr.shape)):
            raise ExportError(f"--input {name}: shape {list(arr.shape)}, the model takes {dims}")


def read_npy(name: str, file: str | Path) -> np.ndarray:
    """One ``.npy`` array (no pickle, no ``.npz``); its header's shape × itemsize must equal the bytes the
    file holds, checked before anything is allocated."""
    try:
        with open(file, "rb") as f:
            if f.read(2) == b"PK":
                raise ExportError(f"--input {name}: {file} is a .npz archive; give one .npy file per input")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            start, size = f.tell(), os.fstat(f.fileno()).st_size
            if dtype.hasobject or dtype.itemsize == 0:
                raise ExportError(f"--input {name}: {file} holds dtype {dtype} (numbers or booleans only)")
            need = math.prod(shape) * dtype.itemsize
            if need != size - start:
                raise ExportError(f"--input {name}: {file} declares shape {list(shape)} of {dtype} ({need} bytes) "
                                  f"but holds {size - start} bytes of data")
            arr = np.fromfile(f, dtype=dtype, count=math.prod(shape))
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise ExportError(f"--input {name}: {file} is not a .npy array ({str(e).strip().splitlines()[0][:120]})") \
            from None
    return arr.reshape(shape, order="F" if fortran else "C")


def run_cli(a: argparse.Namespace) -> int:
    """Run the model on sample inputs; print each output's shape and, per adapter, how far it moves the output."""

    try:
        b, s = (int(x) for x in a.shape.lower().split("x"))
    except ValueError:
        raise ExportError(f"--shape must be BATCHxSEQ like 2x16, got {a.shape!r}") from None
    given = {}
    for item in a.input or []:
        name, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            raise ExportError(f"--input must be NAME=FILE.npy with an existing file, got {item!r}")
        given[name] = read_npy(name, file)
    sess = session(a.model, providers=a.providers)
    check_feeds(sess, given)
    if getattr(a, "generate", None):
        return _generate_cli(a, sess, (b, s), given)
    feeds = sample_inputs(sess, a.model, (b, s), a.vocab, given)
    print(f"{a.model}: providers {sess.get_providers()}; inputs "
          + ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
          + f"; {len(sess.lora_inputs())} LoRA inputs")
    for ad in a.adapter or []:
        sess.run_options(ad)  # load and check every adapter before running anything
    base = sess(feeds)
    for name, out in zip(sess.output_names, base):
        print(f"  {name}: shape {list(out.shape)}, mean {float(np.mean(out)):.6g}, max|x| {float(np.abs(out).max()):.6g}")
    for ad in a.adapter or []:
        outs = sess(feeds, adapter=ad)
        diff = max(float(np.abs(o.astype(np.float64) - r).max()) for o, r in zip(outs, base))
        print(f"  with adapter {ad}: max |adapter - base| = {diff:.6g}")
    return 0


def _generate_cli(a: argparse.Namespace, sess: Any, shape: tuple[int, int], given: dict[str, np.ndarray]) -> int:
    """Greedy-generate ``a.generate`` tokens from the prompt (``--input input_ids=...`` or random ids), per adapter."""

    ids = given.get("input_ids")
    if ids is None:
        high = a.vocab or vocab_size(a.model, "input_ids") or 100
        ids = np.random.default_rng(0).integers(0, high, shape).astype(np.int64)
    mask = given.get("attention_mask")
    for ad in [None, *(a.adapter or [])]:
        out = ort_generate(sess, ids, mask, max_new_tokens=a.generate, eos_token_id=a.eos, adapter=ad)
        print(f"{'base/merged' if ad is None else ad}: generated {out.shape[1] - ids.shape[1]} tokens")
        for row in out[:, ids.shape[1]:]:
            print("  " + " ".join(str(int(t)) for t in row))
    return 0
