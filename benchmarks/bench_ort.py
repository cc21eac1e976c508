"""ORT graph fusions on real all-MiniLM-L6-v2 (batch 8 x seq 128, fp32, CPU), as ratios to torch eager.

Rows: torch eager (the LoRA model merged), ORT merged unfused, ORT merged fused
(``lowrank_compiler.backends.onnx.fusions``), ORT separate unfused and fused with the adapter active
(``.onnx_adapter``). Each round times every variant in turn (median of --iters calls); the table gives
the median over --rounds rounds. Also records what ORT's own transformer optimizer fuses on the same
graph. Writes docs/bench_ort.json and docs/bench_ort.png.

    flock /tmp/lrc-bench.lock python benchmarks/bench_ort.py [--rounds 5] [--iters 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, not an installed one
import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.backends.onnx import export as lo  # noqa: E402
from lowrank_compiler.backends.onnx.fusions import format_report, optimize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import _median_ms, lora_minilm  # noqa: E402


def _kernel_ms(path: Path, feeds: dict, threads: int, runs: int = 5) -> float:
    """Sum of ORT's per-node kernel times for one call (profiling on; median call of ``runs``):
    what the graph costs ORT, less sensitive to other jobs' load than wall time."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level, so.enable_profiling = threads, 3, True
    so.profile_file_prefix = str(path.with_suffix(".prof"))
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sess.run(None, feeds)  # warm-up (not profiled apart: first call is dropped below)
    for _ in range(runs):
        sess.run(None, feeds)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    per_run: list[float] = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            per_run.append(0.0)
        elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and per_run:
            per_run[-1] += e["dur"] / 1e3
    return statistics.median(per_run[1:] or per_run)


def _ort_optimizer_counts(path: Path) -> dict[str, int]:
    """What onnxruntime.transformers.optimizer (model_type bert) fuses on the same graph."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v or k in ("Attention", "MultiHeadAttention")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_ort"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, gm, merged, ids, mask = lora_minilm(a.batch, a.seq, padded_row=True)  # the mask path is exercised
    tmp = Path(tempfile.mkdtemp(prefix="lrc-bench-ort-"))
    lrc.export(gm, tmp / "merged.onnx", merge=True, optimize=False)
    lrc.export(gm, tmp / "sep.onnx", adapters_dir=tmp, adapter_name="task", optimize=False)
    reports = {}
    for name in ("merged", "sep"):
        fused, rep = optimize(onnx.load(str(tmp / f"{name}.onnx")))
        onnx.save(fused, str(tmp / f"{name}_fused.onnx"))
        reports[name] = rep
        print(f"{name}: {format_report(rep)}")
    stock = _ort_optimizer_counts(tmp / "merged.onnx")
    print(f"onnxruntime.transformers.optimizer (bert) on the same merged graph: {stock}")
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    sess = {k: lo.session(tmp / f"{k}.onnx", providers="cpu", threads=a.threads)
            for k in ("merged", "merged_fused", "sep", "sep_fused")}
    adapter = tmp / "task.onnx_adapter"

    def eager():
        with torch.no_grad():
            return merged(ids, attention_mask=mask).last_hidden_state

    variants = {
        "torch eager fp32 (merged)": eager,
        "ORT fp32 merged, unfused": lambda: sess["merged"](feeds),
        "ORT fp32 merged, fused": lambda: sess["merged_fused"](feeds),
        "ORT fp32 separate + adapter, unfused": lambda: sess["sep"](feeds, adapter=adapter),
        "ORT fp32 separate + adapter, fused": lambda: sess["sep_fused"](feeds, adapter=adapter),
    }
    ref = eager().numpy()
    errors = {k: float(np.abs(v()[0] - ref).max()) for k, v in variants.items() if k.startswith("ORT")}
    for k, v in errors.items():
        print(f"max |{k} - torch| = {v:.2g}")
    from lowrank_compiler.backends.onnx.adapters import read_onnx_adapter

    ad_feeds = {**feeds, **read_onnx_adapter(adapter)}
    kernel = {"ORT fp32 merged, unfused": _kernel_ms(tmp / "merged.onnx", feeds, a.threads),
              "ORT fp32 merged, fused": _kernel_ms(tmp / "merged_fused.onnx", feeds, a.threads),
              "ORT fp32 separate + adapter, unfused": _kernel_ms(tmp / "sep.onnx", ad_feeds, a.threads),
              "ORT fp32 separate + adapter, fused": _kernel_ms(tmp / "sep_fused.onnx", ad_feeds, a.threads)}
    for f in variants.values():  # warm-up
        f()
    load_before = os.getloadavg()
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, f in variants.items():
            results[k].append(_median_ms(f, a.iters))
    load_after = os.getloadavg()
    base = statistics.median(results["torch eager fp32 (merged)"])
    rows = [{"variant": k, "ms": statistics.median(v), "min_ms": min(v), "ratio": statistics.median(v) / base,
             "rounds_ms": v, "max_abs_err_vs_torch": errors.get(k, 0.0), "ort_kernel_ms": kernel.get(k)}
            for k, v in results.items()]
    print(f"\nall-MiniLM-L6-v2, batch {a.batch} x seq {a.seq}, {a.threads} threads, LoRA r=8 on query+value; "
          f"{a.rounds} rounds x median of {a.iters}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print("| variant | ms (median) | min of rounds | ratio to torch eager | max abs err vs torch | ORT kernel ms |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        km = f"{r['ort_kernel_ms']:.1f}" if r["ort_kernel_ms"] else "-"
        print(f"| {r['variant']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['ratio']:.2f}x | {r['max_abs_err_vs_torch']:.1g} | {km} |")
    for kind in ("merged", "separate + adapter"):
        u, f = kernel[f"ORT fp32 {kind}, unfused"], kernel[f"ORT fp32 {kind}, fused"]
        print(f"ORT kernel time {kind}: fused / unfused = {f / u:.2f}")
    fused_ratio = next(r["ratio"] for r in rows if r["variant"] == "ORT fp32 merged, fused")
    print(f"target ORT fp32 fused <= 0.85x torch eager: {'met' if fused_ratio <= 0.85 else 'NOT met'} ({fused_ratio:.2f}x)")
    out = {"model": "all-MiniLM-L6-v2", "batch": a.batch, "seq": a.seq, "threads": a.threads, "rounds": a.rounds,
           "iters": a.iters, "load_average": [load_before[0], load_after[0]], "rows": rows,
           "fusions": {k: {"ops": r["ops"], "fusions": {s: n for s, n in r["fusions"].items() if n},
                           "max_abs_diff_vs_unfused": r["max_abs_diff"], "seconds": r["seconds"]} for k, r in reports.items()},
           "ort_transformers_optimizer_bert": stock, "versions": _versions()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(out, indent=1))
    _plot(rows, a, Path(a.out + ".png"))
    print(f"wrote {a.out}.json and {a.out}.png")
    shutil.rmtree(tmp, ignore_errors=True)  # ~350 MB of models


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__}


def _plot(rows: list[dict], a: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    names = [r["variant"] for r in rows][::-1]
    vals = [r["ratio"] for r in rows][::-1]
    colors = ["tab:gray" if n.startswith("torch") else "tab:green" if "fused" in n and "unfused" not in n
              else "tab:blue" for n in names]
    ax.barh(names, vals, color=colors)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(0.85, color="tab:red", ls="--", lw=0.8, label="target 0.85x")
    for y, v in enumerate(vals):
        ax.text(v + 0.01, y, f"{v:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("latency / torch eager fp32 (lower is faster)")
    ax.set_title(f"MiniLM-L6 {a.batch}x{a.seq}, CPU {a.threads} threads, fp32", fontsize=9)
    ax.set_xlim(0, max(vals) * 1.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
