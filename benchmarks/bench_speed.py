"""Training-speed passes on the real all-MiniLM-L6-v2: what each one buys, vs PEFT eager, in one run.

Train step = forward + backward + AdamW step (train mode), batch 16×128, LoRA r=8 alpha=16 dropout 0 on
query/key/value/attention.output.dense. Variants (all with the same AdamW; ``foreach`` is torch's default):
  peft            PEFT eager (the reference)
  lrc             lrc eager (transformed graph)
  lrc+fuse        lrc eager through passes/fuse_siblings.py (q/k/v: one base GEMM, one A GEMM, one B GEMM)
  lrc+fuse+fused  the same with AdamW(fused=True)
  --compile adds  lrc compiled (inductor) and lrc+fuse compiled, optimizer step unchanged.
Variants run round-robin (bench_lora.timed_rounds), median per iteration. ``--memory`` instead runs each
variant in its own process and reports, for one step after a warm-up step (model and optimizer state
already allocated): the peak of live tensor bytes above the step's starting level (torch.profiler's
allocation events, exact and independent of the allocator), and the process peak RSS (VmHWM, reset via
/proc/self/clear_refs before the step; glibc keeps freed blocks, so RSS growth is only indicative; Linux).

    python benchmarks/bench_speed.py [--rounds 7] [--compile] [--memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import bench_lora as bl  # noqa: E402

import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.passes.fuse_siblings import fuse_siblings  # noqa: E402

VARIANTS = ("peft", "lrc", "lrc+fuse", "lrc+fuse+fused")
COMPILED = ("lrc compiled", "lrc+fuse compiled")


def step_fn(name: str, models: dict, ids: torch.Tensor, mask: torch.Tensor):
    gm = models["lrc"]
    if name == "peft":
        model, params = models["peft"], [p for p in models["peft"].parameters() if p.requires_grad]
    else:
        model = fuse_siblings(gm).gm if "fuse" in name else gm
        if "compiled" in name:
            model = lrc.compile(model)
        params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if name.endswith("+fused") else \
        torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model.train()
        loss = bl.hidden(model(ids, attention_mask=mask)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def setup(batch: int, seq: int):
    base, tok = bl.load_minilm()
    ids, mask = bl.make_inputs(tok.vocab_size, batch, seq)
    models = bl.build(base, ids, mask)
    return models, ids, mask


def memory_child(name: str, batch: int, seq: int, threads: int) -> None:
    torch.set_num_threads(threads)
    models, ids, mask = setup(batch, seq)
    for k in [k for k in models if k not in ("lrc", "peft")]:
        del models[k]
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    step = step_fn(name, models, ids, mask)
    step()  # optimizer state allocated, first-call caches warm
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    after = _status_kb("VmHWM")
    print(json.dumps({"name": name, "before_kb": before, "after_kb": after, "tensor_peak_kb": _peak_kb(prof)}))


def _peak_kb(prof) -> int:
    """Peak of live tensor bytes during the profiled step above its starting level: every op's own
    allocations minus frees (and the frees outside ops, ``[memory]`` events) summed in time order."""
    ev = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in ev:
        live += delta
        peak = max(peak, live)
    return peak // 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                    help="cpu (default): this thread's CPU time with 1 thread, robust on a shared machine")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        memory_child(a.child, a.batch, a.seq, a.threads)
        return
    names = VARIANTS + (COMPILED if a.compile else ())
    if a.memory:
        rows = []
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(a.batch), "--seq",
                                  str(a.seq), "--threads", str(a.threads)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        ref = next(r for r in rows if r["name"] == "peft")
        print(f"peak memory of one training step, MiniLM {a.batch}x{a.seq}, one process per variant\n")
        print("| variant | peak live tensors during the step (MiB) | vs PEFT | process peak RSS (MiB) | RSS growth in the step (MiB) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['tensor_peak_kb'] / 1024:.0f} | {r['tensor_peak_kb'] / ref['tensor_peak_kb']:.2f}x "
                  f"| {r['after_kb'] / 1024:.0f} | {(r['after_kb'] - r['before_kb']) / 1024:.0f} |")
        return
    if a.clock == "cpu":
        a.threads = 1
    torch.set_num_threads(a.threads)
    models, ids, mask = setup(a.batch, a.seq)
    fns = {n: step_fn(n, models, ids, mask) for n in names}
    times = bl.timed_rounds(fns, a.rounds, 2, 2, time.thread_time if a.clock == "cpu" else time.perf_counter)
    print(f"MiniLM train step {a.batch}x{a.seq}, {a.threads} thread(s), {a.clock} clock, torch {torch.__version__}, "
          f"{a.rounds} rounds\n")
    print(bl.table("train step (fwd + bwd + AdamW), ratio to PEFT eager", times, "peft", {n: n for n in names}))


if __name__ == "__main__":
    main()
