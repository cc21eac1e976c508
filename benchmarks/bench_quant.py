"""Quantized ONNX deployment of LoRA-tuned all-MiniLM-L6-v2: speed vs torch eager fp32, and error vs fp32.

LoRA r=8 alpha=16 on q/k/v/attention-out (B randomized so the adapters matter). Rows:
  torch eager fp32          the merged graph in torch (the reference for speed and accuracy)
  ORT fp32 merged           lrc export --merge
  ORT int8 plain            dynamic per-channel int8 of every weight MatMul, no smoothing (forced: fails the gate)
  ORT int8 merged           lrc export --merge --quantize int8: smoothing + outlier channels fp32, gated (default)
  ORT int8 8-bit NBits      MatMulNBits bits=8 block 32 (weight-only blocks, int8 compute), all MatMuls, forced
  ORT int4 b32 / b128       MatMulNBits bits=4 block 32 / 128, all MatMuls, forced (the gated int4 keeps most fp32)
  ORT int8 base + fp32 adapter   separate export, quantized base (default int8), the .onnx_adapter active
The gate and the smoothing calibrate on ``--calib`` batches (other random tokens, same shape) plus 8 real
sentences; the error columns are measured on the timed batch and on 8 other sentences, which the quantizer
never saw (held out), against torch fp32.
Timing: median per run over round-robin rounds; ``--clock cpu`` (default) counts this thread's CPU time
with 1 torch thread and 1 ORT intra-op thread (ORT then runs on the calling thread), robust on a shared machine.
Writes docs/quant.json and docs/quant.png.

    flock /tmp/lrc-bench.lock python benchmarks/bench_quant.py [--rounds 5] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import bench_lora as bl  # noqa: E402

import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.backends.onnx import export as lo  # noqa: E402
from lowrank_compiler.backends.onnx.quantize import output_error, quantize_onnx  # noqa: E402

LABELS = {"torch": "torch eager fp32", "fp32": "ORT fp32 merged", "plain": "ORT int8 plain (no smoothing)",
          "int8": "ORT int8 merged (smoothed, gated)", "nbits8": "ORT 8-bit MatMulNBits b32",
          "int4_32": "ORT int4 MatMulNBits b32", "int4_128": "ORT int4 MatMulNBits b128",
          "sep_int8": "ORT int8 base + fp32 adapter"}


SENTENCES = [  # real text for calibration (first 8) and a held-out check (last 8): [CLS]/[SEP], real token statistics
    "the cat sat on the mat", "low-rank adapters are small and fast to train", "graphs are rewritten by passes",
    "a quick brown fox jumps over the lazy dog near the river bank", "quantization trades accuracy for speed",
    "sentence embeddings map text to vectors", "the weather today is sunny with a light breeze",
    "onnx runtime runs models on many devices",
    "she sold her old bicycle to buy a new laptop", "the museum opens at nine and closes at five",
    "compilers rewrite programs into faster ones", "he forgot his umbrella and got soaked in the rain",
    "matrix multiplication dominates transformer inference", "the recipe needs two eggs and a cup of flour",
    "our team shipped the release on friday evening", "birds migrate south when the days get shorter"]


def text_batch(tok, sentences: list[str]) -> dict[str, np.ndarray]:
    enc = tok(sentences, padding="longest", return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def calibration_batches(vocab: int, mask: torch.Tensor, n: int) -> list[dict[str, np.ndarray]]:
    """Other random tokens with the timed batch's padding: the quantizer's samples (the timed batch is held out)."""
    out = []
    for seed in range(1, n + 1):
        ids = torch.randint(1000, vocab, mask.shape, generator=torch.Generator().manual_seed(seed)) * mask
        out.append({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return out


def nbits(src: Path, dst: Path, bits: int, block: int) -> None:
    """MatMulNBits of every weight MatMul (no gate: the row shows what this format costs and keeps)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    onnx.save(q.model.model, str(dst))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = [r["label"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    colors = ["#888" if r["cosine"] is None else "#2a7" if r["cosine"] >= 0.999 else "#c44" for r in rows]
    bars = ax.barh(names[::-1], ratios[::-1], color=colors[::-1])
    for b, r in zip(bars, rows[::-1]):
        note = "reference" if r["cosine"] is None else f"cos {r['cosine']:.5f}"
        ax.text(b.get_width() + 0.01, b.get_y() + b.get_height() / 2, f"{r['ratio']:.2f}x  {note}", va="center", fontsize=8)
    ax.axvline(0.60, color="k", ls="--", lw=0.8)
    ax.text(0.61, len(rows) - 0.45, "target 0.60x", fontsize=8)
    ax.set_xlabel("time vs torch eager fp32 (lower is faster); green: cosine >= 0.999 on held-out batch")
    ax.set_xlim(0, max(ratios) * 1.35)
    ax.set_title(title.replace(", batch", ",\nbatch"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=1, help="random-token calibration batches (+ 8 sentences)")
    ap.add_argument("--out", default=str(HERE.parent / "docs"))
    a = ap.parse_args()
    threads = 1 if a.clock == "cpu" else a.threads
    torch.set_num_threads(threads)
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    base, tok = bl.load_minilm()
    ids, mask = bl.make_inputs(tok.vocab_size, a.batch, a.seq)
    gm = lrc.transform(base, bl.LRC_SPEC, example_inputs=(ids[:2],), example_kwargs={"attention_mask": mask[:2]},
                       progress=False)
    bl.randomize_b(dict(gm.named_parameters()))
    gm.eval()
    merged = lrc.merge(gm).eval()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    calib = calibration_batches(tok.vocab_size, mask, a.calib) + [text_batch(tok, SENTENCES[:8])]
    text = text_batch(tok, SENTENCES[8:])
    with torch.no_grad():
        ref = [bl.hidden(merged(ids, attention_mask=mask)).numpy()]
        text_ref = [bl.hidden(merged(torch.as_tensor(text["input_ids"]),
                                     attention_mask=torch.as_tensor(text["attention_mask"]))).numpy()]
    reports: dict[str, dict] = {}
    qtime: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        lrc.export(gm, d / "fp32.onnx", merge=True, optimize=False)  # what --quantize exports
        lrc.export(gm, d / "sep.onnx", adapters_dir=d, adapter_name="task", optimize=False)
        adapter = d / "task.onnx_adapter"
        for k, fn in {
            "int8": lambda: quantize_onnx(d / "fp32.onnx", d / "int8.onnx", "int8", samples=calib),
            "plain": lambda: quantize_onnx(d / "fp32.onnx", d / "plain.onnx", "int8", samples=calib, smooth=False,
                                           search=False, force=True),
            "sep_int8": lambda: quantize_onnx(d / "sep.onnx", d / "sep_int8.onnx", "int8", samples=calib,
                                              adapters=[adapter]),
            "nbits8": lambda: nbits(d / "fp32.onnx", d / "nbits8.onnx", 8, 32),
            "int4_32": lambda: nbits(d / "fp32.onnx", d / "int4_32.onnx", 4, 32),
            "int4_128": lambda: nbits(d / "fp32.onnx", d / "int4_128.onnx", 4, 128),
        }.items():
            t = time.perf_counter()
            r = fn()
            qtime[k] = time.perf_counter() - t
            if r is not None:
                reports[k] = r
        sess = {k: lo.session(d / f"{k}.onnx", providers="cpu", threads=threads)
                for k in ("fp32", "plain", "int8", "nbits8", "int4_32", "int4_128", "sep_int8")}

        def ort(k: str):
            ad = adapter if k == "sep_int8" else None
            return lambda: sess[k](feeds, adapter=ad)

        def eager() -> None:
            with torch.no_grad():
                merged(ids, attention_mask=mask)

        fns = {"torch": eager, **{k: ort(k) for k in sess}}
        outs = {k: [np.asarray(fn()[0])] for k, fn in fns.items() if k != "torch"}
        text_err = {k: output_error(text_ref, [sess[k](text, adapter=adapter if k == "sep_int8" else None)[0]])
                    for k in sess}
        times = bl.timed_rounds(fns, a.rounds, 2, 2, clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()
    title = (f"all-MiniLM-L6-v2 + LoRA r=8 (q/k/v/attn-out) merged, batch {a.batch}x{a.seq}, {threads} thread(s), "
             f"{a.clock} clock, {a.rounds} rounds, {a.calib} calibration batch(es), load avg {load[0]:.1f}")
    print(title + "\n")
    print("| variant | median ms | vs torch eager fp32 | max abs err (held out) | cosine (held out) "
          "| cosine (held-out text) | gate cosine (calib) | MatMuls int8 / fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k in fns:
        err = output_error(ref, outs[k]) if k in outs else None
        r = reports.get(k)
        gate = "" if r is None else f"{r['cosine']:.6f} {'pass' if r['passed'] else 'FAIL'}"
        split = "" if r is None else f"{r['quantized']} / {len(r['kept_fp32'])}"
        if r is not None and r.get("smoothed"):
            split += f" (+{r['outlier_channels']} outlier ch.)"
        print(f"| {LABELS[k]} | {1e3 * med[k]:.1f} | {med[k] / med['torch']:.3f}x | "
              f"{'' if err is None else f'{err[0]:.3g}'} | {'' if err is None else f'{err[1]:.6f}'} | "
              f"{f'{text_err[k][1]:.6f}' if k in text_err else ''} | {gate} | {split} |")
        rows.append({"key": k, "label": LABELS[k], "ms": 1e3 * med[k], "ratio": med[k] / med["torch"],
                     "max_abs_err": None if err is None else err[0], "cosine": None if err is None else err[1],
                     "text_cosine": text_err[k][1] if k in text_err else None,
                     "report": {kk: v for kk, v in (r or {}).items() if kk != "kept_fp32"} or None,
                     "kept_fp32": None if r is None else r["kept_fp32"], "quantize_s": qtime.get(k)})
    print("\nquantize time (s, wall): " + ", ".join(f"{k} {v:.0f}" for k, v in qtime.items()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps({"title": title, "loadavg": load, "rows": rows}, indent=1) + "\n")
    plot(rows, out / "quant.png", title)
    print(f"wrote {out / 'quant.json'} and {out / 'quant.png'}")


if __name__ == "__main__":
    main()
