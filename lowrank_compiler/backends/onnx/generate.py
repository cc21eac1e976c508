"""Causal LMs in ONNX Runtime: export the decode graph with a KV cache, and a greedy generation loop.

The exported model takes ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq],
``position_ids`` [batch, seq] (when the model has them) and ``past.<i>.key`` / ``past.<i>.value``
[batch, kv_heads, past, head_dim]; it returns ``logits`` [batch, seq, vocab] and ``present.<i>.key`` /
``present.<i>.value``. One graph serves prefill (past = 0) and decode (seq = 1). The graph is the
face dispatcher's variant for a decode call with a ``DynamicCache`` (the same graph torch's
``generate`` runs), merged or with each LoRA pair as an ORT adapter input (``.onnx_adapter``).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lowrank_compiler.backends.onnx.adapters import (
    adapter_input_renames,
    lora_adapter_tensors,
    make_lora_inputs,
    write_onnx_adapter,
)
from lowrank_compiler.backends.onnx.decode_steps import decode_steps
from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.backends.onnx.fusions import optimize as ort_optimize
from lowrank_compiler.backends.onnx.upcast import (
    float32_initializers,
    float32_inputs,
    fp32_compute,
    fp32_sites,
    low_precision,
    upcast_notice,
)
from lowrank_compiler.errors import ExportError, LoadError
from lowrank_compiler.formats.load import with_face
from lowrank_compiler.ir import (
    META_KEY,
    adapter_nodes,
    frozen_shared_copy,
    logical_weight,
    lrc_meta,
    set_logical_weight,
)
from lowrank_compiler.passes.merge import merge as merge_pass
from lowrank_compiler.passes.separate import separate
from lowrank_compiler.safety.atomic import check_target

_EXAMPLE = (2, 3, 5)  # batch, new tokens, past tokens: distinct sizes > 1, so none specialises


def unmerged_copy(gm: fx.GraphModule, original: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` with every adapter unmerged; ``original``: also undo known base offsets (LoRA-GA),
    so the base weights are the original model's."""
    out = frozen_shared_copy(gm)
    for node in adapter_nodes(out):
        mark = node.meta[META_KEY]
        mod = out.get_submodule(mark.module_path)
        off = mod.base_offset() if original else None
        if not mod.merged and off is None:
            continue
        with torch.no_grad():
            w = logical_weight(out, mark)
            if mod.merged:
                w = mod.unmerged_weight(w)
                mod.merged = False
            if off is not None:
                w = (w.float() + (off.B.float() @ off.A.float()) * float(off.scale)).to(w.dtype)
            set_logical_weight(out, mark, w)
    return out


def with_hf_face(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` if it has a face (``generate``, every call); else, for a graph of an HF model (its config recorded),
    a copy with the face ``lrc.load`` gives (``formats/rebuild.py``: the transformers class by registry name,
    never code from the file, over the copy's own tensors and adapters).

    Raises:
        LoadError: the recorded config/class cannot be rebuilt, or the graph cannot serve other calls.
    """
    if getattr(gm, "lrc_face", None) is not None or not lrc_meta(gm).get("hf_config"):
        return gm
    out = with_face(copy.deepcopy(gm), "the recorded Hugging Face model")
    if getattr(out, "lrc_face", None) is None:
        raise LoadError("cannot rebuild the recorded Hugging Face model: the graph records no transformers class "
                        "or no traced call (transform the HF model again, or export with format='onnx' and "
                        "no decoder)")
    return out


def decode_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str], Any]:
    """(decode graph, its input names, the cache's pytree spec) from ``gm``'s face dispatcher."""
    from transformers import DynamicCache

    face = getattr(gm, "lrc_face", None)
    if face is None or not hasattr(face.model, "config"):
        raise ExportError("decoder export needs a model transformed from an HF causal LM (lrc.transform(model, spec))")
    cfg = face.model.config
    b, s, p = _EXAMPLE
    vocab = int(getattr(cfg, "vocab_size", 100))
    g = torch.Generator().manual_seed(0)
    with face.plain_forward(), torch.no_grad():  # a real cache of `p` tokens from the model itself
        cache = face.model(torch.randint(0, vocab, (b, p), generator=g), use_cache=True).cache \
            if "cache" in face.signature.parameters else None
    if not isinstance(cache, DynamicCache):
        raise ExportError(f"{type(face.model).__name__} does not return a DynamicCache; decoder export needs one")
    kwargs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, (b, s), generator=g),
                              "attention_mask": torch.ones(b, p + s, dtype=torch.long), "cache": cache,
                              "use_cache": True}
    if "position_ids" in face.signature.parameters:
        kwargs["position_ids"] = torch.arange(p, p + s).expand(b, s).contiguous()
    bound = face.bind((), kwargs)
    entry = face.entry(gm, bound)
    spec = tree_flatten(cache)[1]
    return entry.gm, entry.names, (spec, [bound[n] for n in entry.names])


class _DecoderFlat(nn.Module):
    """``forward(*inputs, *past) -> (logits, *present)`` over the decode graph (attribute ``gm``: ONNX names)."""

    def __init__(self, gm: fx.GraphModule, names: list[str], spec: Any) -> None:
        super().__init__()
        self.gm, self.names, self.spec = gm, names, spec

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self.names) - 1
        cache = tree_unflatten(list(flat[n:]), self.spec)
        args = list(flat[:n])
        values = [cache if name == "cache" else args.pop(0) for name in self.names]
        out = self.gm(*values)
        return (out["logits"], *tree_flatten(out["cache"])[0])


def export_decoder_onnx(gm: fx.GraphModule, path: str | os.PathLike, *, merge: bool = True,
                        adapters_dir: str | os.PathLike | None = None, adapter_name: str = "default",
                        opset: int | None = None, external_data: bool | None = None,
                        validate: bool = True, optimize: bool = False,
                        gain_sites: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Write the decode graph with past key values as ONNX; returns ``{path, inputs, outputs, adapters, max_abs_diff}``.

    ``merge=False`` keeps the base weights and takes each LoRA pair as an ORT adapter input (a DoRA
    site also its gain, default ones; ``gain_sites``: sites that take a gain input whatever this
    model's method there, so other adapter sets' DoRA files fit the graph); this
    model's adapters go to ``<adapters_dir>/<adapter_name>.onnx_adapter``. ``external_data``: weights
    in ``<path>.data`` beside the model (default: when they exceed 2 GB, protobuf's limit).
    ``optimize``: ONNX Runtime fusions (``backends/onnx/fusions``), checked on the example decode inputs.
    """
    import onnx

    source_dtype = low_precision(gm)
    if source_dtype is not None:  # ORT's CPU provider has no bf16 Mul / Gemm: the file would not run there
        print(upcast_notice(source_dtype), file=sys.stderr)
    var, names, (spec, values) = decode_graph(gm)
    var.eval()
    renames: dict[str, tuple[str, int | None]] = {}
    if merge:
        target = merge_pass(fp32_sites(frozen_shared_copy(var)) if source_dtype else frozen_shared_copy(var)).gm
    else:
        target = separate(var, placeholder_seed=0, gain_sites=gain_sites).gm
        renames = adapter_input_renames(var, target)
    if source_dtype is not None:  # computes in fp32 over the bf16 tensors; initializers upcast when written
        target, var = fp32_compute(target, source_dtype), fp32_compute(var, source_dtype)
        values = float32_inputs(values, source_dtype)
    flat = _DecoderFlat(target.eval(), names, spec).eval()
    cache_leaves = tree_flatten(values[names.index("cache")])[0]
    n_layers = len(cache_leaves) // 2
    past = [f"past.{i}.{kv}" for kv in ("key", "value") for i in range(n_layers)]
    in_names = [n for n in names if n != "cache"] + past
    out_names = ["logits"] + [n.replace("past.", "present.") for n in past]
    inputs = tuple(v for n, v in zip(names, values) if n != "cache") + tuple(cache_leaves)
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dims: list[dict[int, Any]] = []
    for n in in_names:
        if n == "attention_mask":
            dims.append({0: batch, 1: torch.export.Dim.AUTO})
        elif n.startswith("past."):
            dims.append({0: batch, 2: past_len})
        else:
            dims.append({0: batch, 1: seq})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(flat, inputs, None, input_names=in_names, output_names=out_names,
                                     opset_version=opset, dynamic_shapes=(tuple(dims),), dynamo=True,
                                     external_data=False, optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.onnx.export of the decode graph failed: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300]}") from None
    path = check_target(path, "file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if source_dtype is not None:
        float32_initializers(prog.model)
    size = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
    external = size > 2_000_000_000 if external_data is None else external_data
    fusion_report = None
    # written in a folder beside ``path`` and moved in when complete: a failed export leaves nothing behind
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = stage / path.name
        if external:  # weights streamed from the torch tensors to <path>.data, once; the proto never holds them
            _save_external(prog, staged, renames)
        else:
            model = prog.model_proto
            if renames:
                model = make_lora_inputs(model, renames)
            if optimize:  # the numerics check runs ORT on the in-memory model
                model, fusion_report = ort_optimize(model, feeds={n: v.numpy() for n, v in zip(in_names, inputs)})
            onnx.checker.check_model(model, full_check=True)
            onnx.save_model(model, str(staged))
        for f in sorted(stage.iterdir(), key=lambda f: f == staged):  # the data file before the graph naming it
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report: dict[str, Any] = {"path": str(path), "inputs": in_names, "outputs": out_names, "adapters": [],
                              "external_data": bool(external), "dtype": "float32",
                              "source_dtype": str(source_dtype or torch.float32).replace("torch.", "")}
    if optimize:
        report["optimize"] = fusion_report or {"fusions": {}, "ops": {}, "max_abs_diff": 0.0, "seconds": 0.0,
                                               "fallback": "not fused: the weights are external data"}
    adapter_path = None
    if not merge and adapter_nodes(gm):
        adapter_path = Path(adapters_dir or path.parent) / f"{adapter_name}.onnx_adapter"
        write_onnx_adapter(lora_adapter_tensors(gm), adapter_path)
        report["adapters"].append(str(adapter_path))
    if validate:
        sess = session(path, providers="cpu")
        with torch.no_grad():
            ref = flat.__class__(var, names, spec)(*inputs)
        got = sess(dict(zip(in_names, inputs)), adapter=adapter_path)
        report["max_abs_diff"] = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))
    return report


def next_tokens(logits: np.ndarray, do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> np.ndarray:
    """The next token per row from last-position ``logits`` [batch, vocab]: argmax, or HF ``generate``'s
    sampling (temperature, then top-k, then top-p, then ``torch.multinomial``; HF's defaults top_k=50, top_p=1.0;
    top_k=0 / top_p=1.0 switch a filter off), so a seeded generator draws the tokens HF draws after
    ``torch.manual_seed`` of the same seed."""
    if not do_sample:
        return logits.argmax(-1).astype(np.int64, copy=False)
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ExportError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0; got temperature="
                          f"{temperature}, top_p={top_p}, top_k={top_k}")
    scores = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scores, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1).numpy().astype(np.int64)


def _save_external(prog: Any, path: Path, renames: dict[str, tuple[str, int | None]]) -> Any:
    """Write ``prog`` as ``path`` + ``path.data``; each weight goes from its torch tensor to the file once.

    onnx_ir streams the initializers (one tensor in flight); the proto read back holds only references,
    so turning the LoRA initializers into adapter inputs (they are loaded alone) never touches the weights.
    """
    import onnx
    import onnx_ir
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    data_name = path.name + ".data"
    onnx_ir.save(prog.model, str(path), external_data=data_name, size_threshold_bytes=1024, max_workers=1,
                 max_in_flight_bytes=1 << 26)
    model = onnx.load(str(path), load_external_data=False)
    if renames:
        for init in model.graph.initializer:
            if init.name in renames and uses_external_data(init):
                load_external_data_for_tensor(init, str(path.parent))
        model = make_lora_inputs(model, renames)  # its bytes stay in the data file, unreferenced (r x d each)
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return model


def ort_generate(sess: Any, input_ids: np.ndarray | torch.Tensor, attention_mask: np.ndarray | torch.Tensor | None = None,
                 max_new_tokens: int = 16, eos_token_id: int | None = None, pad_token_id: int = 0,
                 adapter: str | os.PathLike | None = None, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, seed: int | None = None) -> np.ndarray:
    """Generation in ONNX Runtime over a model from :func:`export_decoder_onnx` (HF ``generate`` semantics):
    greedy, or sampling (``do_sample``: temperature / top-k / top-p with ``seed``, as :func:`next_tokens`).

    ``sess``: an :func:`lowrank_compiler.backends.onnx.export.session`; ``adapter``: an ``.onnx_adapter`` to
    run with (None: merged weights, or the base model). Left-padded batches need ``attention_mask``.
    Returns prompt + new tokens, [batch, seq + ≤ max_new_tokens]; rows that hit ``eos_token_id`` are padded.
    """
    gen = torch.Generator().manual_seed(int(seed)) if do_sample and seed is not None else None
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(
        attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask, dtype=np.int64)
    b, s = ids.shape
    out = np.empty((b, s + max_new_tokens), np.int64)
    out[:, :s] = ids
    steps = decode_steps(sess, ids, mask, adapter)
    logits = next(steps) if max_new_tokens > 0 else None
    unfinished = np.ones(b, dtype=bool)
    n = 0
    while n < max_new_tokens:
        nxt = next_tokens(logits, do_sample, temperature, top_k, top_p, gen)
        if eos_token_id is not None:
            nxt = np.where(unfinished, nxt, pad_token_id)
            unfinished &= nxt != eos_token_id
        out[:, s + n] = nxt
        n += 1
        if n == max_new_tokens or (eos_token_id is not None and not unfinished.any()):
            break
        logits = steps.send(nxt)
    steps.close()
    return out[:, :s + n]
