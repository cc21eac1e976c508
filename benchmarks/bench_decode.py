"""Decode speed side by side in one run: HF torch, PEFT, lrc in torch (unmerged / merged), lrc's ORT loop
(base / adapter / merged) and onnxruntime-genai (base / adapter); prefill and decode apart; batch 1 and 8.

A Llama- or Qwen2-shaped model from a stock config (random weights; ``--hidden`` x ``--layers``, vocab 2000),
LoRA r=8 on attention + MLP (B random, so the adapter moves the output). The ORT rows and genai run the
folder ``lrc.export(gm, dir, format="genai")`` writes (base graph with overridable LoRA inputs, the adapter
as ``.onnx_adapter``); "ORT merged" is the merged decode graph. Every engine greedy-generates ``--new``
tokens after a ``--prompt``-token prompt (no eos); prefill = prompt in, first token out; decode = the other
tokens. Rounds are interleaved (each round times every variant once, in turn) and the medians reported,
wall clock and process CPU time (CPU time moves less on a shared machine). The goals are judged on
the decode rows; state the load average (printed, and written with the table) next to any number.

    python benchmarks/bench_decode.py [--config llama|qwen2] [--hidden 256] [--layers 4] [--quick]
        [--rounds 5] [--new 32] [--prompt 16] [--threads 2] [--device cpu|cuda] [--only SUBSTR ...]

Writes ``docs/bench_decode_<config>_<hidden>x<layers>.{md,json,png}``. Rows live in ``_decode_variants.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lowrank_compiler
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode_variants import VARIANTS, Variant, context  # noqa: E402

BATCHES = (1, 8)
# (label, variant, reference, minimum ratio of the variant's decode tok/s to the reference's)
GOALS = [
    ("lrc unmerged >= 0.95x HF base", "lrc torch, unmerged", "HF torch, base", 0.95),
    ("lrc unmerged >= PEFT", "lrc torch, unmerged", "PEFT, LoRA", 1.0),
    ("ORT adapter within 5% of ORT merged", "lrc ORT loop, adapter", "lrc ORT loop, merged", 0.95),
    ("lrc ORT loop base not slower than genai base", "lrc ORT loop, base", "onnxruntime-genai, base", 1.0),
    ("lrc ORT loop adapter not slower than genai adapter", "lrc ORT loop, adapter", "onnxruntime-genai, adapter", 1.0),
]


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` in one line (exit 2) when torch, ONNX Runtime or genai lack CUDA here."""
    if device != "cuda":
        return
    import onnxruntime as ort

    why = ("torch sees no CUDA device" if not torch.cuda.is_available() else
           f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
           if "CUDAExecutionProvider" not in ort.get_available_providers() else None)
    if why:
        print(f"bench_decode: --device cuda refused: {why}; run with --device cpu", file=sys.stderr)
        raise SystemExit(2)


def measure(variants: list[Variant], runners: dict, rounds: int, prompt: int, new: int) -> dict[int, dict[str, dict]]:
    """``{batch: {variant: {prefill_ms, decode_tok_s, decode_cpu_ms_per_tok}}}`` (medians over rounds)."""
    out: dict[int, dict[str, dict]] = {}
    for b in BATCHES:
        ids = np.random.default_rng(b).integers(3, 2000, (b, prompt)).astype(np.int64)
        for v in variants:  # warm-up: traces, loads adapters, first-shape allocations
            runners[v.name](ids, new)
        times: dict[str, list] = {v.name: [] for v in variants}
        for _ in range(rounds):
            for v in variants:
                times[v.name].append(runners[v.name](ids, new))
        out[b] = {}
        for name, ts in times.items():
            med = [statistics.median(t[k] for t in ts) for k in range(4)]
            out[b][name] = {"prefill_ms": med[0] * 1e3, "decode_tok_s": b * (new - 1) / med[1],
                            "decode_cpu_ms_per_tok": med[3] * 1e3 / (new - 1)}
        print(f"batch {b} done (load {load()})", flush=True)
    return out


def judge(res: dict[int, dict[str, dict]]) -> list[tuple[str, int, float, float, bool, bool]]:
    """``(goal, batch, wall ratio, CPU-time ratio, wall pass, CPU pass)`` for each goal whose rows ran: the
    variant's decode speed over the reference's, from wall-clock tok/s and from CPU ms per token (the CPU
    ratio is the one to read on a loaded machine, where wall time mostly measures other people's jobs)."""
    rows = []
    for label, var, ref, need in GOALS:
        for b, r in res.items():
            if var in r and ref in r:
                wall = r[var]["decode_tok_s"] / r[ref]["decode_tok_s"]
                cpu = r[ref]["decode_cpu_ms_per_tok"] / r[var]["decode_cpu_ms_per_tok"]
                rows.append((label, b, wall, cpu, wall >= need, cpu >= need))
    return rows


def table(res: dict[int, dict[str, dict]], header: str) -> str:
    names = list(next(iter(res.values())))
    lines = [header, "", "| variant | " + " | ".join(f"prefill ms b={b} | decode tok/s b={b} | CPU ms/tok b={b}"
                                                  for b in res) + " |",
             "|---|" + "---:|---:|---:|" * len(res)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{res[b][n]['prefill_ms']:.1f} | {res[b][n]['decode_tok_s']:.0f} | "
                                              f"{res[b][n]['decode_cpu_ms_per_tok']:.2f}" for b in res) + " |")
    goals = judge(res)
    if goals:
        lines += ["", "| goal (decode speed ratio) | batch | wall | CPU time |", "|---|---:|---:|---:|"]
        lines += [f"| {g} | {b} | {w:.3f} {'pass' if wok else 'FAIL'} | {c:.3f} {'pass' if cok else 'FAIL'} |"
                  for g, b, w, c, wok, cok in goals]
    return "\n".join(lines)


def plot(res: dict[int, dict[str, dict]], variants: list[Variant], title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    colors = {"torch": "#4c72b0", "ort": "#dd8452", "genai": "#55a868"}
    fig, axes = plt.subplots(1, len(res), figsize=(5.5 * len(res), 4), squeeze=False)
    for ax, (b, r) in zip(axes[0], res.items()):
        names = [v.name for v in variants if v.name in r]
        ax.barh(range(len(names)), [r[n]["decode_tok_s"] for n in names],
                color=[colors.get(v.engine, "gray") for v in variants if v.name in r])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (higher is better)")
        ax.set_title(f"batch {b}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama", choices=("llama", "qwen2"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="3 rounds of 16 new tokens (a few minutes)")
    ap.add_argument("--only", nargs="*", default=None, help="run the variants whose name contains one of these")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.new = min(a.rounds, 3), min(a.new, 16)
    check_device(a.device)
    torch.set_num_threads(a.threads)
    variants = [v for v in VARIANTS if not a.only or any(s.lower() in v.name.lower() for s in a.only)]
    ctx = context(a.config, a.hidden, a.layers, a.device, a.threads, Path(tempfile.mkdtemp(prefix="bench_decode.")))
    runners = {}
    for v in variants:
        try:
            runners[v.name] = v.make(ctx)
        except Exception as e:  # noqa: BLE001  (on cuda a row may lack a GPU build, e.g. genai's CPU wheel)
            if a.device != "cuda":
                raise
            print(f"skipped on cuda: {v.name} ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})")
            continue
        print(f"ready: {v.name}", flush=True)
    variants = [v for v in variants if v.name in runners]
    before = load()
    res = measure(variants, runners, a.rounds, a.prompt, a.new)
    header = (f"{a.config} hidden {a.hidden} x {a.layers} layers, LoRA r=8 on attention+MLP, prompt {a.prompt}, "
              f"{a.new} new tokens, {a.device} ({a.threads} threads, {os.cpu_count()} CPUs), median of {a.rounds} "
              f"interleaved rounds; load average {before} before, {load()} after")
    text = table(res, header)
    print(text)
    out, stem = Path(a.out), f"bench_decode_{a.config}_{a.hidden}x{a.layers}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"header": header, "results": {str(b): r for b, r in res.items()},
                                                  "goals": judge(res)}, indent=1) + "\n")
    plot(res, variants, header if len(header) < 120 else header[:header.index(", median")], out / f"{stem}.png")


if __name__ == "__main__":
    main()
