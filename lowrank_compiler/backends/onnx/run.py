"""``lrc run``: a smoke run of an exported ONNX model in ONNX Runtime, with and without adapters."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.backends.onnx.genai import MODEL_FILE, GenaiRunner, genai_available, is_genai_folder
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
    engine = getattr(a, "engine", "auto")
    folder = Path(a.model) if Path(a.model).is_dir() else None
    if folder is not None and not is_genai_folder(folder):
        raise ExportError(f"{folder} is a directory without genai_config.json; pass an .onnx file or a folder "
                          "from `lrc export MODEL --format genai -o DIR`")
    if folder is not None and not getattr(a, "generate", None):
        raise ExportError(f"{folder} is a genai folder: run it with --generate N")
    if engine == "genai" and folder is None:
        raise ExportError("--engine genai needs a genai folder (`lrc export MODEL --format genai -o DIR`), "
                          f"not {a.model}")
    if folder is not None and (engine == "genai" or (engine == "auto" and genai_available())):
        return _generate_cli(a, GenaiRunner(folder), (b, s), given)
    model_path = folder / MODEL_FILE if folder is not None else Path(a.model)
    if folder is not None:  # adapter names of the folder (`--adapter NAME`) for lrc's own loop too
        a.adapter = [str(folder / "adapters" / f"{x}.onnx_adapter") if not Path(x).is_file()
                     and (folder / "adapters" / f"{x}.onnx_adapter").is_file() else x for x in a.adapter or []]
    a.model = str(model_path)
    sess = session(model_path, providers=a.providers)
    check_feeds(sess, given)
    if getattr(a, "generate", None):
        return _generate_cli(a, sess, (b, s), given)
    if getattr(a, "prompt", None) or getattr(a, "sample", False):
        raise ExportError("--prompt and --sample go with --generate N")
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


def _generate_cli(a: argparse.Namespace, engine: Any, shape: tuple[int, int], given: dict[str, np.ndarray]) -> int:
    """Generate ``a.generate`` tokens from the prompt (``--prompt`` text, ``--input input_ids=...`` or random
    ids), once for the base and once per ``--adapter``; ``engine``: a :class:`GenaiRunner` or an ORT session."""
    genai = isinstance(engine, GenaiRunner)
    sampling = dict(do_sample=bool(a.sample), temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    tok = None
    ids = given.get("input_ids")
    if a.prompt:
        if not genai:
            raise ExportError("--prompt needs a genai folder with a tokenizer (`lrc export MODEL --format genai "
                              "-o DIR`) and onnxruntime-genai; with an .onnx file pass --input input_ids=FILE.npy")
        tok = engine.tokenizer()
        rows = [engine.encode(tok, p) for p in a.prompt]
        if len({len(r) for r in rows}) > 1:
            raise ExportError("--prompt: prompts of different token lengths cannot share a batch yet; "
                              "run them one at a time")
        ids = np.asarray(rows, dtype=np.int64)
    if ids is None:
        high = a.vocab or vocab_size(engine.folder / MODEL_FILE if genai else a.model, "input_ids") or 100
        ids = np.random.default_rng(0).integers(0, high, shape).astype(np.int64)
    mask = given.get("attention_mask")
    if genai and mask is not None and not mask.all():
        raise ExportError("--engine genai takes unpadded prompts; drop the padded attention_mask or use --engine ort")
    for ad in [None, *(a.adapter or [])]:
        if genai:
            out = np.asarray(engine.generate(ids, a.generate, ad, **sampling), dtype=object)
        else:
            out = ort_generate(engine, ids, mask, max_new_tokens=a.generate, eos_token_id=a.eos, adapter=ad,
                               **sampling)
        label = "base/merged" if ad is None else str(ad)
        print(f"{label}: generated {len(out[0]) - ids.shape[1]} tokens ({'onnxruntime-genai' if genai else 'lrc ORT loop'}"
              f"{', sampled' if a.sample else ', greedy'})")
        for row in out:  # text: the prompt and its continuation, as HF's decode(generate(...)[0], skip_special_tokens=True)
            new = [int(t) for t in row[ids.shape[1]:]]
            print("  " + (tok.decode(np.asarray([int(t) for t in row], dtype=np.int32)) if tok is not None
                          else " ".join(str(t) for t in new)))
    return 0
