"""Quantized causal-LM decode graphs (int8 / int4) with an accuracy gate on generated tokens and logits.

The base weight MatMuls of a decode graph (:mod:`.generate`) are quantized weight-only with ONNX
Runtime's ``MatMulNBits`` (blocks of 32 along the input dimension, ``accuracy_level`` 4: int8 compute on
CPU): 8 bits symmetric for ``int8``, 4 bits asymmetric for ``int4`` (symmetric int4 measured worse:
greedy agreement 0.75 / 0.67 / 0.08 against 0.83 / 0.75 / 0.25 on the three models of :data:`GATES`).
int8 as ``MatMulNBits`` was measured against dynamic int8 (``MatMulInteger``) on a random-weight
hidden-512 x 4-layer Llama: as fast for batch-1 decode and more accurate (logits cosine 0.99973 vs 0.99930: one scale per 32 weights instead of per column, and no
activation quantization). The LoRA branch MatMuls (overridable ``<site>.lora_A/B.weight`` inputs) stay
fp32, so ``.onnx_adapter`` files still switch per run (and per generator in onnxruntime-genai); the
embedding ``Gather`` is never touched and the LM head (the MatMul that writes ``logits``) stays fp32
(int8 of it bought ~10% decode speed at 512 x 4 but flipped more greedy tokens on tiny Qwen2).

The gate (held-out prompts: seeded token ids that no calibration saw; there is no calibration, the
quantization is weight-only): for every prompt, with no adapter and with each adapter file, the fp32
graph greedy-decodes ``steps`` tokens with its KV cache, and the quantized graph decodes the same tokens
(teacher-forced, so one early flip does not cascade). Measured: the minimum cosine between the two
last-position logit vectors over all steps, and the greedy-token agreement (fraction of steps whose
argmax equals the fp32 token). The fp32 graph itself is checked against torch by the export
(``max_abs_diff``). Thresholds per mode (:data:`GATES`) come from docs/generate.md's measurements.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_compiler.backends.onnx.decode_steps import decode_steps
from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx
from lowrank_compiler.backends.onnx.quantize import MODES, check_finite, nbits_quantizer, weight_matmuls
from lowrank_compiler.errors import ExportError
from lowrank_compiler.safety.atomic import atomic_write

# (min logits cosine, min greedy-token agreement) per mode. Measured minimums (3 prompts x 12 tokens, base and
# a LoRA adapter): int8 0.99990 / 1.00 (tiny Llama), 0.99990 / 0.92 (tiny Qwen2), 0.99973 / 0.92 (random
# 512 x 4 Llama); int4 (asymmetric) 0.9881 / 0.83, 0.9911 / 0.75, 0.967 / 0.25 (random weights: near-flat
# logits make greedy argmaxes fragile, so the 512 x 4 random model fails the int4 gate; docs/generate.md)
GATES = {"int8": (0.999, 0.8), "int4": (0.98, 0.6)}
GATE_PROMPTS, GATE_PROMPT_LEN, GATE_STEPS, GATE_SEED = 3, 8, 12, 20231


def held_out_prompts(vocab: int, n: int = GATE_PROMPTS, length: int = GATE_PROMPT_LEN,
                     seed: int = GATE_SEED) -> list[np.ndarray]:
    """``n`` prompts [1, length] of token ids in [3, vocab) from ``seed`` (not the export's example inputs)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(min(3, vocab - 1), vocab, (1, length)).astype(np.int64) for _ in range(n)]


def lm_head(model: Any) -> str | None:
    """The name of the MatMul that writes ``logits`` (through shape-only ops), or None."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = "logits"
    while name in producer:
        n = producer[name]
        if n.op_type == "MatMul":
            return n.name
        if n.op_type not in ("Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze") or not n.input:
            return None
        name = n.input[0]
    return None


def quantize_decoder_model(model: Any, mode: str, exclude: list[str] | None = None,
                           keep_lm_head: bool = True) -> tuple[Any, dict[str, Any]]:
    """``(quantized ModelProto, {quantized, lora_fp32, kept_fp32})``: every base weight MatMul of ``model`` to
    ``MatMulNBits`` with ``mode``'s bits, except the LoRA branch, ``exclude`` and (``keep_lm_head``) the LM head."""
    import logging

    if mode not in MODES:
        raise ExportError(f"unknown quantization {mode!r}; valid: {', '.join(MODES)}")
    base, lora = weight_matmuls(model)  # also names every node
    head = lm_head(model)
    keep = set(exclude or []) | ({head} if keep_lm_head and head else set())
    include = [n for n in base if n not in keep]
    if not include:
        raise ExportError("the decode graph has no weight MatMul to quantize (LoRA branch and LM head stay fp32)")
    skip = {n.name for n in model.graph.node if n.op_type == "MatMul"} - set(include)
    logging.disable(logging.WARNING)  # ORT logs every node it quantizes
    try:
        q = nbits_quantizer()(model, bits=4 if mode == "int4" else 8, block_size=32, is_symmetric=mode == "int8",
                              accuracy_level=4, nodes_to_exclude=sorted(skip))
        q.process()
    finally:
        logging.disable(logging.NOTSET)
    return q.model.model, {"quantized": len(include), "lora_fp32": len(lora), "kept_fp32": sorted(keep)}


def _decode(sess: Any, prompt: np.ndarray, steps: int, adapter: str | None,
            forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(greedy tokens [steps], last-position logits [steps, vocab] float64) with the KV cache; ``forced``:
    feed these tokens instead of the argmax (teacher forcing)."""
    run = decode_steps(sess, prompt, np.ones_like(prompt), adapter)
    toks, logits = [], []
    last = next(run)[0]
    for k in range(steps):
        logits.append(np.asarray(last, np.float64))
        toks.append(int(last.argmax()))
        if k + 1 < steps:
            last = run.send(np.array([forced[k] if forced is not None else toks[-1]], np.int64))[0]
    run.close()
    return np.array(toks), np.stack(logits)


def decoder_gate(fp32: str | os.PathLike, quantized: str | os.PathLike, adapters: list[str] | None = None,
                 prompts: list[np.ndarray] | None = None, steps: int = GATE_STEPS) -> dict[str, Any]:
    """Measure ``quantized`` against ``fp32`` (module docstring); returns ``{cosine, agreement, runs: [...]}``
    (minimums over runs; one run per prompt x (no adapter, each adapter))."""
    ref, got = session(fp32, providers="cpu"), session(quantized, providers="cpu")
    if prompts is None:
        vocab = next((int(o.shape[-1]) for o in ref.get_outputs() if o.name == "logits"
                      and isinstance(o.shape[-1], int)), 100)
        prompts = held_out_prompts(vocab)
    runs = []
    for adapter in [None, *(str(a) for a in adapters or [])]:
        for i, p in enumerate(prompts):
            toks, ref_logits = _decode(ref, p, steps, adapter)
            q_toks, q_logits = _decode(got, p, steps, adapter, forced=toks)
            dots = (ref_logits * q_logits).sum(-1)
            norms = np.linalg.norm(ref_logits, axis=-1) * np.linalg.norm(q_logits, axis=-1)
            cos = float(np.min(dots / np.maximum(norms, 1e-30)))
            runs.append({"adapter": None if adapter is None else Path(adapter).stem, "prompt": i, "cosine": cos,
                         "agreement": float((q_toks == toks).mean()), "tokens": toks.tolist()})
    return {"cosine": min(r["cosine"] for r in runs), "agreement": min(r["agreement"] for r in runs),
            "runs": runs, "prompts": len(prompts), "steps": steps}


def _save(model: Any, dst: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def quantize_decoder(src: str | os.PathLike, dst: str | os.PathLike, mode: str, *,
                     adapters: list[str] | None = None, gate: bool = True, force: bool = False,
                     min_cosine: float | None = None, min_agreement: float | None = None,
                     prompts: list[np.ndarray] | None = None, external_data: bool = False,
                     keep_lm_head: bool = True) -> dict[str, Any]:
    """Quantize the fp32 decode graph ``src`` (+ its external data) to ``dst`` and gate it (module docstring).

    ``dst`` is written in a folder of its own choosing by the caller: this writes ``dst`` (and, with
    ``external_data``, ``dst.data``) only after the gate passed (or ``force`` / ``gate=False``).
    Returns ``{quantize, quantized, lora_fp32, kept_fp32, gate: {...} | None, passed, min_cosine, min_agreement}``.

    Raises:
        ExportError: unknown mode, a bad threshold, or the gate failed without ``force`` (nothing written).
    """
    import onnx

    if mode not in MODES:
        raise ExportError(f"unknown quantization {mode!r}; valid: {', '.join(MODES)}")
    cos_min = GATES[mode][0] if min_cosine is None else min_cosine
    agree_min = GATES[mode][1] if min_agreement is None else min_agreement
    if not 0.0 < cos_min <= 1.0 or not 0.0 <= agree_min <= 1.0:
        raise ExportError(f"min_cosine must be in (0, 1] and min_agreement in [0, 1], got {cos_min}, {agree_min}")
    dst = Path(dst)
    model, report = quantize_decoder_model(onnx.load(str(src)), mode, keep_lm_head=keep_lm_head)
    report.update(quantize=mode, min_cosine=cos_min, min_agreement=agree_min, gate=None, passed=True, forced=False)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / dst.name
        _save(model, tmp, external_data)
        del model
        if gate:
            g = decoder_gate(src, tmp, adapters, prompts)
            passed = g["cosine"] >= cos_min and g["agreement"] >= agree_min
            report.update(gate={k: v for k, v in g.items()}, passed=passed, forced=bool(force and not passed))
            if not passed and not force:
                raise ExportError(
                    f"{mode} decoder is too inaccurate on {g['prompts']} held-out prompt(s) x {g['steps']} tokens: "
                    f"logits cosine {g['cosine']:.5f} (gate >= {cos_min}), greedy agreement {g['agreement']:.2f} "
                    f"(gate >= {agree_min}); nothing written (--force / force=True writes it, --no-gate skips it)")
        if external_data:
            data = tmp.with_name(tmp.name + ".data")
            atomic_write(dst.with_name(dst.name + ".data"), lambda f: shutil.copyfileobj(data.open("rb"), f))
        atomic_write(dst, lambda f: f.write(tmp.read_bytes()))
    report["size_bytes"] = sum(p.stat().st_size for p in (dst, dst.with_name(dst.name + ".data")) if p.is_file())
    return report


def export_quantized_decoder(gm: Any, path: str | os.PathLike, mode: str, *, merge: bool = False,
                             adapters_dir: str | os.PathLike | None = None, adapter_name: str = "default",
                             opset: int | None = None, validate: bool = True, gate: bool = True,
                             force: bool = False, min_cosine: float | None = None) -> dict[str, Any]:
    """``export_decoder_onnx`` to a temporary folder, then :func:`quantize_decoder` to ``path``; the adapter
    file (fp32) is moved to ``adapters_dir`` only after the gate passed, so a refusal writes nothing."""
    if mode not in MODES:
        raise ExportError(f"unknown quantization {mode!r}; valid: {', '.join(MODES)}")
    check_finite(gm)
    path = Path(path)
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / path.name
        report = export_decoder_onnx(gm, fp32, merge=merge, adapters_dir=d, adapter_name=adapter_name,
                                     opset=opset, validate=validate)
        report.update(quantize_decoder(fp32, path, mode, adapters=report["adapters"], gate=gate, force=force,
                                       min_cosine=min_cosine, external_data=report["external_data"]))
        moved = []
        for a in report["adapters"]:
            target = Path(adapters_dir or path.parent) / Path(a).name
            atomic_write(target, lambda f, a=a: f.write(Path(a).read_bytes()))
            moved.append(str(target))
        report["adapters"], report["path"] = moved, str(path)
    return report


def format_decoder_report(r: dict[str, Any]) -> str:
    """One line for the CLI: what was quantized, and the gate's measurements."""
    g = r.get("gate")
    if g is None:
        gate = "gate skipped (--no-gate)"
    else:
        verdict = "PASSED" if r["passed"] else "FAILED (forced)"
        gate = (f"on {g['prompts']} held-out prompt(s) x {g['steps']} tokens, with no adapter and each adapter: "
                f"logits cosine {g['cosine']:.5f} (>= {r['min_cosine']}), greedy agreement {g['agreement']:.2f} "
                f"(>= {r['min_agreement']}): {verdict}")
    return (f"{r['quantize']} decoder: {r['quantized']} MatMul(s) quantized, {r['lora_fp32']} LoRA-branch and "
            f"{len(r['kept_fp32'])} other (LM head) fp32; {gate}")
