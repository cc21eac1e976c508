"""Step time and memory of LoRA training on the real all-MiniLM-L6-v2 vs number of processes (gloo, CPU).

Global batch G×S is split over N processes (each 1 torch thread), so N=2 on two idle cores should
take about half the time of N=1 plus the communication: DDP all-reduces the adapter gradients; FSDP2
(whole graph one unit) all-gathers every parameter each forward and again in backward and
reduce-scatters the adapter gradients; FSDP2 per block (``fsdp(gm, per_block=True)``) does the same
one block at a time. LoRA r=8 on q/k/v/attention-out, AdamW. Median of timed steps after a warm-up.

Memory per rank, from one extra profiled step: the parameter bytes each rank holds at rest (shards
under FSDP2), and the peak of live tensor bytes during the step above its starting level
(torch.profiler allocation events, as in bench_speed.py --memory): activations, gathered weights,
gradients. Writes docs/scale.json and docs/scale.png.

    flock /tmp/lrc-bench.lock python benchmarks/bench_scale.py [--procs 1 2] [--batch 16] [--seq 128] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
SPEC = "; ".join(f"attention.{t}:lora(r=8, alpha=16)" for t in ("self.query", "self.key", "self.value",
                                                                 "output.dense"))
MODES = ("ddp", "fsdp", "fsdp_block")
LABEL = {"single": "single process", "ddp": "DDP", "fsdp": "FSDP2, whole graph", "fsdp_block": "FSDP2, per block"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, mode: str, batch: int, seq: int, steps: int, out: str) -> None:
    import torch.distributed as dist
    from _minilm_task import load_minilm, make_batches
    from bench_speed import _peak_kb
    from torch.profiler import ProfilerActivity, profile

    import lowrank_compiler as lrc
    from lowrank_compiler import distributed as lrcd

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    b = make_batches(1, batch=batch, seq=seq)[0]
    n = batch // world
    ids, mask = b["input_ids"][rank * n:(rank + 1) * n], b["attention_mask"][rank * n:(rank + 1) * n]
    gm = lrc.transform(load_minilm(), SPEC, example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                       progress=False)
    fwd = gm
    if world > 1:
        fwd = lrcd.ddp(gm) if mode == "ddp" else lrcd.fsdp(gm, per_block=mode == "fsdp_block")
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-4)
    gm.train()

    def step() -> None:
        loss = fwd(ids, attention_mask=mask).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    times = []
    for i in range(steps + 1):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if world > 1:
            dist.barrier()
        if i >= 1:
            times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    local = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in gm.parameters())
    res = {"step_s": statistics.median(times), "params_mb": local / 2**20, "peak_mb": _peak_kb(prof) / 1024}
    Path(f"{out}.{rank}").write_text(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r")
        a = (world, _port(), mode, args.batch, args.seq, args.steps, out)
        if world == 1:
            worker(0, *a)
        else:
            torch.multiprocessing.spawn(worker, args=a, nprocs=world)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    return {"procs": world, "mode": mode, "step_s": ranks[0]["step_s"],
            "params_mb": max(r["params_mb"] for r in ranks), "peak_mb": max(r["peak_mb"] for r in ranks)}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["mode"] == "single")
    fig, ax = plt.subplots(figsize=(6, 4))
    procs = sorted({r["procs"] for r in rows})
    ax.plot(procs, [base["step_s"] / n for n in procs], "k:", label="ideal (1 process / N)")
    for mode, marker in zip(MODES, "osd"):
        pts = [(1, base["step_s"])] + [(r["procs"], r["step_s"]) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*pts), marker=marker, label=LABEL[mode])
    ax.set_xticks(procs)
    ax.set_xlabel("processes (gloo, 1 thread each)")
    ax.set_ylabel("train step (s), global batch fixed")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "scale"), help="writes OUT.json and OUT.png")
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows = [run(1, "single", args)]
    for n in args.procs:
        if n > 1:
            rows += [run(n, mode, args) for mode in MODES]
    load1 = os.getloadavg()
    base = rows[0]["step_s"]
    title = (f"MiniLM LoRA train step, global batch {args.batch}x{args.seq}, 1 thread per process, "
             f"{os.cpu_count()} CPU cores")
    print(f"\n{title}; load average {load0[0]:.1f} before, {load1[0]:.1f} after\n")
    print("| processes | wrapper | step (s) | speed-up vs 1 process | params per rank (MiB) | "
          "peak live tensors in a step, per rank (MiB) |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        r["speedup"] = base / r["step_s"]
        print(f"| {r['procs']} | {LABEL[r['mode']]} | {r['step_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['params_mb']:.1f} | {r['peak_mb']:.0f} |")
    out = Path(args.out)
    meta = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "cpu_count": os.cpu_count(),
            "loadavg_before": load0, "loadavg_after": load1, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"), title)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
