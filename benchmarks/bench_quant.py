"""Quantized ONNX deployment of LoRA-tuned all-MiniLM-L6-v2: speed vs torch eager fp32, and error vs fp32.

LoRA r=8 alpha=16 on q/k/v/attention-out (B randomized so the adapters matter). Rows:
  torch eager fp32    the merged graph in torch (the reference for speed and accuracy)
  ORT fp32 merged     lrc export --merge
  ORT int8 merged     + --quantize int8 (dynamic, per-channel; sensitive MatMuls kept fp32 by the gate's search)
  ORT int4 merged     + --quantize int4 (MatMulNBits, block 32, accuracy_level 4)
  ORT int8 base + fp32 adapter   separate export, quantized base, the .onnx_adapter active (QLoRA-style serving)
Error: max abs and cosine of last_hidden_state vs torch fp32 on the timed batch (8×128 by default).
Timing: median per run over round-robin rounds; ``--clock cpu`` (default) counts this thread's CPU time
with 1 torch thread and 1 ORT intra-op thread (ORT then runs on the calling thread), robust on a shared machine.

    python benchmarks/bench_quant.py [--rounds 7] [--batch 8] [--seq 128] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
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
from lowrank_compiler.backends import onnx as lo  # noqa: E402
from lowrank_compiler.backends.quantize import output_error, quantize_onnx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    ap.add_argument("--threads", type=int, default=1)
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
    feeds = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ref = [bl.hidden(merged(ids, attention_mask=mask)).numpy()]
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        lrc.export(gm, d / "fp32.onnx", merge=True)
        lrc.export(gm, d / "sep.onnx", adapters_dir=d, adapter_name="task")
        samples = [feeds]
        reports["int8"] = quantize_onnx(d / "fp32.onnx", d / "int8.onnx", "int8", samples=samples)
        reports["int4"] = quantize_onnx(d / "fp32.onnx", d / "int4.onnx", "int4", samples=samples, force=True)
        reports["sep"] = quantize_onnx(d / "sep.onnx", d / "sep_int8.onnx", "int8", samples=samples,
                                       adapters=[d / "task.onnx_adapter"])
        sess = {k: lo.session(d / f"{k}.onnx", providers="cpu", threads=threads)
                for k in ("fp32", "int8", "int4", "sep_int8")}
        adapter = d / "task.onnx_adapter"

        def ort(k: str):
            ad = adapter if k == "sep_int8" else None
            return lambda: sess[k](feeds, adapter=ad)

        def eager() -> None:
            with torch.no_grad():
                merged(ids, attention_mask=mask)

        fns = {"torch": eager, **{k: ort(k) for k in sess}}
        outs = {k: [np.asarray(fn()[0])] for k, fn in fns.items() if k != "torch"}
        times = bl.timed_rounds(fns, a.rounds, 2, 2, clock)
    labels = {"torch": "torch eager fp32", "fp32": "ORT fp32 merged", "int8": "ORT int8 merged",
              "int4": "ORT int4 merged", "sep_int8": "ORT int8 base + fp32 adapter"}
    rep_of = {"int8": "int8", "int4": "int4", "sep_int8": "sep"}
    import statistics

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"all-MiniLM-L6-v2 + LoRA r=8 (q/k/v/attn-out), batch {a.batch}x{a.seq}, {threads} thread(s), "
          f"{a.clock} clock, {a.rounds} rounds\n")
    print("| variant | median ms | vs torch eager fp32 | max abs err vs torch | cosine vs torch | gate |")
    print("|---|---|---|---|---|---|")
    for k in fns:
        err = output_error(ref, outs[k]) if k in outs else (0.0, 1.0)
        r = reports.get(rep_of.get(k, ""), None)
        gate = "" if r is None else (f"{'pass' if r['passed'] else 'FAIL'} ({r['quantized']} quantized, "
                                     f"{len(r['kept_fp32'])} kept fp32)")
        print(f"| {labels[k]} | {1e3 * med[k]:.1f} | {med[k] / med['torch']:.3f}x | {err[0]:.3g} | {err[1]:.6f} | {gate} |")


if __name__ == "__main__":
    main()
