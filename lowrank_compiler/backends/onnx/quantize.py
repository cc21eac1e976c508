"""Quantized ONNX deployment with an accuracy gate: int8 (dynamic, per-channel) and ORT 4-bit MatMulNBits.

Only the base model's weight MatMuls are quantized. In a model exported with separate adapters, the
LoRA branch MatMuls (whose weights are overridable ``<site>.lora_A/B.weight`` inputs) stay fp32, so
``.onnx_adapter`` files still switch per run on the quantized base: QLoRA-style serving.

The gate: every quantization runs the fp32 and the quantized model in ONNX Runtime on sample inputs
(with no adapter and with each given adapter) and measures, over every output, the max absolute error
and the cosine between the flattened outputs. Below ``min_cosine`` (default 0.999) the export is
refused (``ExportError``) unless ``force``. Why 0.999: plain per-channel int8 of all of MiniLM's MatMuls
gives 0.985, per-tensor 0.936 (issue 15: unusable); fp16 rounding gives > 0.99999. 0.999 means the error
vector is ~4.5% of the output's norm (sqrt(2·(1 − cos))), which keeps nearest-neighbour rankings of
sentence embeddings whose cosines differ by more than ~0.01 and is what int8 of (nearly) every MatMul
reaches after smoothing (:mod:`.smoothquant`: outlier migration + outlier channels in fp32).

Sensitive ops are found, not guessed: when quantizing every weight MatMul fails the gate, each MatMul
is ranked by the smoothing's simulated int8 error, or (no smoothing) quantized alone and ranked by its
error (1 − cos); then the most sensitive are kept fp32 one at a time (a few checks), and if that is
not enough a binary search finds a long passing prefix of the ranking (least sensitive first).
The report lists what stayed fp32.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowrank_compiler.backends.onnx.export import example_inputs_of, export_onnx, session
from lowrank_compiler.backends.onnx.smoothquant import OUTLIER_PREFIX, smooth
from lowrank_compiler.errors import ExportError
from lowrank_compiler.safety.atomic import atomic_write

MODES = ("int8", "int4")
DEFAULT_MIN_COSINE = 0.999


def output_error(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(max |got − ref|, min over outputs of cos(ref, got)) on the flattened outputs, in float64."""
    max_abs, cos = 0.0, 1.0
    for r, g in zip(ref, got):
        r64, g64 = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
        if not r64.size:
            continue
        max_abs = max(max_abs, float(np.abs(r64 - g64).max()))
        nr, ng = float(np.linalg.norm(r64)), float(np.linalg.norm(g64))
        c = 1.0 if nr == ng == 0.0 else float(r64 @ g64 / (nr * ng)) if nr and ng else 0.0
        cos = min(cos, c)
    return max_abs, cos


def weight_matmuls(model: Any) -> tuple[list[str], list[str]]:
    """(names of MatMuls with a constant weight input, names of LoRA-branch MatMuls that must stay fp32).

    A LoRA MatMul reads an overridable adapter input (a graph input that is also an initializer) or
    the output of one (x·A, then ·B).
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    lora_inputs = inits & graph_inputs
    base, lora = [], []
    for i, n in enumerate(g.node):
        if not n.name:
            n.name = f"lrc_node_{i}"
        if n.op_type != "MatMul":  # Gemm (e.g. BERT's pooler) has no MatMulNBits form; left fp32
            continue
        if any(x in lora_inputs for x in n.input):
            lora.append(n.name)
        elif len(n.input) > 1 and n.input[1] in inits:
            base.append(n.name)
    return base, lora


def nbits_quantizer() -> Any:
    """ORT's ``MatMulNBitsQuantizer`` class, imported without the root-logger setup its module does
    (``logging.basicConfig(level=INFO)``: every library's INFO lines would print afterwards)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:], root.level = handlers, level
    return MatMulNBitsQuantizer


def _quantize(src: Path, dst: Path, mode: str, include: list[str], exclude: list[str]) -> None:
    """Write ``src`` with the ``include`` MatMuls quantized (ORT's per-node INFO/WARNING logs silenced)."""
    import logging

    logging.disable(logging.WARNING)
    try:
        _quantize_impl(src, dst, mode, include, exclude)
    finally:
        logging.disable(logging.NOTSET)


def _quantize_impl(src: Path, dst: Path, mode: str, include: list[str], exclude: list[str]) -> None:
    import onnx

    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=include, nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
        return
    MatMulNBitsQuantizer = nbits_quantizer()
    model = onnx.load(str(src))
    weight_matmuls(model)  # names every node, so include/exclude lists refer to the same names
    skip = {n.name for n in model.graph.node if n.op_type == "MatMul"} - set(include)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4,
                             nodes_to_exclude=sorted(skip | set(exclude)))
    q.process()
    onnx.save(q.model.model, str(dst))


class _Runner:
    """fp32 reference outputs on every (feeds, adapter) sample, and the error of a candidate model."""

    def __init__(self, fp32: Path, samples: list[dict[str, np.ndarray]], adapters: list[str | None]) -> None:
        self.samples, self.adapters = samples, adapters
        ref = session(fp32, providers="cpu")
        self.ref = [ref(f, adapter=a) for f in samples for a in adapters]

    def error(self, path: Path) -> tuple[float, float]:
        sess = session(path, providers="cpu")
        got = [sess(f, adapter=a) for f in self.samples for a in self.adapters]
        errs = [output_error(r, g) for r, g in zip(self.ref, got)]
        return max(e[0] for e in errs), min(e[1] for e in errs)


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "int8", *,
                  samples: list[dict[str, Any]], adapters: list[str | os.PathLike] | None = None,
                  min_cosine: float = DEFAULT_MIN_COSINE, force: bool = False,
                  exclude: list[str] | None = None, search: bool = True, smooth: bool = True) -> dict[str, Any]:
    """Quantize the fp32 ONNX model ``src`` to ``dst`` and gate it on ``samples`` (input feeds).

    ``adapters``: ``.onnx_adapter`` files also checked (each sample runs with no adapter and with each).
    ``exclude``: node names kept fp32 in addition to the LoRA branch. ``smooth`` (int8 only): first
    migrate activation outliers into the weights and take the worst channels out of the int8 products
    (:mod:`.smoothquant`; exact in fp32, checked on the samples). ``search``: when quantizing every
    weight MatMul fails the gate, keep the most sensitive ones fp32 (module docstring). Returns
    ``{quantize, max_abs_err, cosine, min_cosine, quantized, kept_fp32, passed, forced, smoothed,
    outlier_channels, all_quantized: {max_abs_err, cosine} before the search}``.

    Raises:
        ExportError: unknown mode, no samples, a bad ``min_cosine``, or the gate failed without ``force``
            (the message gives both errors); ``dst`` is written only when the gate passed or was forced.
    """
    if mode not in MODES:
        raise ExportError(f"unknown quantization {mode!r}; valid: {', '.join(MODES)}")
    if not samples:
        raise ExportError("quantization needs at least one sample input to measure its error against fp32")
    if not 0.0 < min_cosine <= 1.0:
        raise ExportError(f"min_cosine must be in (0, 1], got {min_cosine}")
    import onnx

    dst = Path(dst)
    feeds = [{k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in s.items()}
             for s in samples]
    with tempfile.TemporaryDirectory() as d:
        model = onnx.load(str(src))
        unnamed = any(not n.name for n in model.graph.node)
        base, lora = weight_matmuls(model)  # names unnamed nodes: quantize the named copy
        if unnamed:
            onnx.save(model, str(Path(d) / "named.onnx"))
        src = Path(d) / "named.onnx" if unnamed else Path(src)
        del model
        exclude = list(lora) + list(exclude or [])
        cands = [n for n in base if n not in exclude]
        if not cands:
            raise ExportError(f"{src}: no weight MatMul to quantize (LoRA-branch MatMuls stay fp32)")
        runner = _Runner(src, feeds, [None] + [str(a) for a in adapters or []])
        smoothed: dict[str, Any] = {}
        if smooth and mode == "int8":
            src, smoothed, extra = _smooth(src, Path(d) / "smoothed.onnx", cands, feeds, runner)
            exclude += extra  # the fp32 outlier MatMuls it added
        tmp = Path(d) / "q.onnx"
        chosen = cands
        _quantize(src, tmp, mode, chosen, exclude)
        max_abs, cos = runner.error(tmp)
        all_q = (max_abs, cos)
        if cos < min_cosine and search and len(cands) > 1:
            ranking = {n: v["error"] for v in smoothed.values() for n in v["nodes"]} or None
            found = _search(src, Path(d) / "s.onnx", Path(d), mode, cands, exclude, runner, min_cosine, ranking)
            if found is not None:  # else: no subset passes; keep the all-quantized model (for force)
                (chosen, max_abs, cos), tmp = found, Path(d) / "s.onnx"
        passed = cos >= min_cosine
        report = {"quantize": mode, "max_abs_err": max_abs, "cosine": cos, "min_cosine": min_cosine,
                  "quantized": len(chosen), "kept_fp32": sorted(set(cands) - set(chosen)),
                  "lora_fp32": len(lora), "passed": passed, "forced": bool(force and not passed),
                  "all_quantized": {"max_abs_err": all_q[0], "cosine": all_q[1]},
                  "smoothed": sum(v["how"] != "none" for v in smoothed.values()), "outlier_channels": sum(len(v["outliers"]) for v in smoothed.values())}
        if not passed and not force:
            raise ExportError(f"{mode} quantization is too inaccurate: output cosine {cos:.8f} < {min_cosine} "
                              f"(max abs error {max_abs:.4g} vs fp32 on {len(feeds)} sample input(s)"
                              f"{', and no subset of the MatMuls passes' if search and len(cands) > 1 else ''}); "
                              "pass force=True (--force) to write it anyway, or lower min_cosine")

        data = tmp.read_bytes()
        atomic_write(dst, lambda f: f.write(data))
    return report


def _smooth(src: Path, dst: Path, cands: list[str], feeds: list[dict[str, np.ndarray]], runner: _Runner
            ) -> tuple[Path, dict[str, Any], list[str]]:
    """Write the smoothed fp32 model to ``dst``; (its path, what :func:`smoothquant.smooth` did, the
    outlier MatMuls to keep fp32). Refuses (ExportError) if it changed the fp32 outputs."""
    import onnx

    model = onnx.load(str(src))
    done = smooth(model, cands, feeds)
    if all(v["how"] == "none" for v in done.values()):
        return src, done, []
    onnx.save(model, str(dst))
    max_abs, cos = runner.error(dst)
    if cos < 1 - 1e-6:  # exact up to fp32 rounding; anything else is a bug in a fold
        raise ExportError(f"{src}: smoothing changed the fp32 model (output cosine {cos:.8f}, max abs error "
                          f"{max_abs:.3g}); quantize with smooth=False")
    return dst, done, [n.name for n in model.graph.node if n.name.startswith(OUTLIER_PREFIX)]


GREEDY_STEPS = 6  # keep the 1..6 most sensitive fp32 one by one before bisecting


def _search(src: Path, tmp: Path, d: Path, mode: str, cands: list[str], exclude: list[str], runner: _Runner,
            min_cosine: float, ranking: dict[str, float] | None = None) -> tuple[list[str], float, float] | None:
    """Rank the candidates by their error quantized alone (or by ``ranking``: the smoothing's simulated
    error of each, which costs no ORT run), then find a long prefix of that ranking (least sensitive
    first) that passes: first drop the most sensitive one at a time (``GREEDY_STEPS`` checks: near the
    threshold the error is not monotone in the prefix, and bisection could stop at a short one), then
    bisect the rest. ``(chosen, max_abs, cos)`` written to ``tmp``, or None."""
    sens: list[tuple[float, str]] = []
    trial = d / "trial.onnx"
    for name in cands:
        if ranking is not None and name in ranking:
            sens.append((ranking[name], name))
            continue
        _quantize(src, trial, mode, [name], exclude)
        sens.append((1.0 - runner.error(trial)[1], name))
    sens.sort()
    names = [n for _, n in sens]

    def check(k: int) -> tuple[list[str], float, float] | None:
        _quantize(src, trial, mode, names[:k], exclude)
        max_abs, cos = runner.error(trial)
        if cos < min_cosine:
            return None
        tmp.write_bytes(trial.read_bytes())
        return names[:k], max_abs, cos

    for k in range(len(names) - 1, max(len(names) - 1 - GREEDY_STEPS, 0), -1):
        found = check(k)
        if found is not None:
            return found
    lo, hi = 0, max(len(names) - GREEDY_STEPS, 1)  # a prefix of length lo passes (0 trivially); hi fails
    best: tuple[list[str], float, float] | None = None
    while hi - lo > 1:
        k = (lo + hi) // 2
        found = check(k)
        if found is not None:
            lo, best = k, found
        else:
            hi = k
    return best


def check_finite(gm: Any) -> None:
    """Refuse (ExportError) a model with a NaN/inf parameter or buffer: its quantization scales would be undefined."""
    bad = [k for k, t in [*gm.named_parameters(), *gm.named_buffers()]
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ExportError(f"cannot quantize: tensor(s) {bad[:5]} have NaN/inf entries (quantization scales "
                          "would be undefined); fix or merge the model first")


def export_quantized(gm: Any, path: str | os.PathLike, mode: str, *, force: bool = False,
                     min_cosine: float = DEFAULT_MIN_COSINE, samples: list[Any] | None = None,
                     **onnx_kwargs: Any) -> dict[str, Any]:
    """``export_onnx`` to a temporary fp32 model, then :func:`quantize_onnx` it to ``path``.

    Samples: the graph's recorded example inputs plus ``samples`` (tuples in graph-input order, or
    dicts by input name). The adapters the export writes are gated too (and stay fp32 files).
    """

    if mode not in MODES:
        raise ExportError(f"unknown quantization {mode!r}; valid: {', '.join(MODES)}")
    check_finite(gm)
    inputs, names = example_inputs_of(gm)
    feeds = [dict(zip(names, inputs))]
    for s in samples or []:
        feeds.append(dict(s) if isinstance(s, dict) else dict(zip(names, s)))
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as d:
        fp32 = Path(d) / path.name
        report = export_onnx(gm, fp32, **onnx_kwargs)
        report["path"] = str(path)
        report.update(quantize_onnx(fp32, path, mode, samples=feeds, adapters=report.get("adapters"),
                                    min_cosine=min_cosine, force=force))
    return report


def format_report(r: dict[str, Any]) -> str:
    """One line for the CLI: error vs fp32, gate, what stayed fp32."""
    gate = "PASSED" if r["passed"] else "FAILED (forced)" if r["forced"] else "FAILED"
    kept = f", {len(r['kept_fp32'])} sensitive MatMul(s) kept fp32" if r["kept_fp32"] else ""
    if r.get("smoothed"):
        kept += f", {r['smoothed']} input(s) smoothed, {r['outlier_channels']} outlier channel(s) fp32"
    lora = f", {r['lora_fp32']} LoRA-branch MatMul(s) fp32" if r.get("lora_fp32") else ""
    return (f"{r['quantize']} vs fp32 on the sample inputs: max abs error {r['max_abs_err']:.4g}, output cosine "
            f"{r['cosine']:.6f} (gate >= {r['min_cosine']}: {gate}); {r['quantized']} MatMul(s) quantized{kept}{lora}")
