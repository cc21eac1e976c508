"""Step time and memory of LoRA training on the real all-MiniLM-L6-v2 vs number of processes (gloo, CPU).

Global batch G×S is split over N processes (each 1 torch thread), so N=2 on two idle cores should
take about half the time of N=1 plus the communication: DDP all-reduces the adapter gradients; FSDP2
(whole graph one unit) all-gathers every parameter each forward and again in backward and
reduce-scatters the adapter gradients; FSDP2 per block (``fsdp(gm, per_block=True)``) does the same
one block at a time. LoRA r=8 on q/k/v/attention-out, AdamW. One job of N processes holds every
variant (deep copies of one traced model) and steps them round-robin, the 1-process reference being
rank 0 alone on the whole batch while the others wait; median per variant over the rounds after a
warm-up round, so load changes on a shared machine hit every variant alike.

Memory per rank, from one extra profiled step: the parameter bytes each rank holds at rest (shards
under FSDP2), and the peak of live tensor bytes during the step above its starting level
(torch.profiler allocation events, as in bench_memory.py): activations, gathered weights,
gradients. Writes docs/scale.json and docs/scale.png.

    flock /tmp/lrc-bench.lock python benchmarks/bench_scale.py [--procs 1 2] [--batch 16] [--seq 128] [--rounds 5]
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


def worker(rank: int, world: int, port: int, batch: int, seq: int, rounds: int, out: str) -> None:
    """One rank: the same traced model wrapped every way, stepped round-robin (1 process = rank 0 alone
    on the whole batch while the others wait), so load changes hit every variant alike."""
    import copy

    import torch.distributed as dist
    from _minilm_task import load_minilm, make_batches
    from bench_memory import _peak_kb
    from torch.profiler import ProfilerActivity, profile

    import lowrank_compiler as lrc
    from lowrank_compiler.training import distributed as lrcd

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = make_batches(1, batch=batch, seq=seq)[0]
    n = batch // world
    part = {k: v[rank * n:(rank + 1) * n] for k, v in b.items()}
    gm = lrc.transform(load_minilm(), SPEC, example_inputs=(part["input_ids"],),
                       example_kwargs={"attention_mask": part["attention_mask"]}, progress=False)
    wrap = {"single": lambda g: g, "ddp": lrcd.ddp, "fsdp": lrcd.fsdp,
            "fsdp_block": lambda g: lrcd.fsdp(g, per_block=True)}
    runs = {}
    for mode in ("single", *MODES):
        if mode == "single" and rank != 0:
            continue
        g = copy.deepcopy(gm).train()
        fwd = wrap[mode](g)
        runs[mode] = (fwd, lrc.optimizer(g, torch.optim.AdamW, lr=1e-4), g, b if mode == "single" else part)

    def step(mode: str) -> None:
        fwd, opt, _, x = runs[mode]
        loss = fwd(x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    times: dict[str, list[float]] = {m: [] for m in ("single", *MODES)}
    for r in range(rounds + 1):  # round 0 warms up
        for mode in times:
            dist.barrier()
            t0 = time.perf_counter()
            if mode in runs:
                step(mode)
            dist.barrier()
            if r:
                times[mode].append(time.perf_counter() - t0)
    res = {}
    for mode in times:
        dist.barrier()
        if mode not in runs:
            continue
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(mode)
        g = runs[mode][2]
        local = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in g.parameters())
        res[mode] = {"step_s": statistics.median(times[mode]), "params_mb": local / 2**20,
                     "peak_mb": _peak_kb(prof) / 1024}
    Path(f"{out}.{rank}").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r")
        torch.multiprocessing.spawn(worker, args=(world, _port(), args.batch, args.seq, args.rounds, out),
                                    nprocs=world)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    rows = []
    for mode in ("single", *MODES):
        got = [r[mode] for r in ranks if mode in r]
        rows.append({"procs": 1 if mode == "single" else world, "mode": mode, "step_s": got[0]["step_s"],
                     "params_mb": max(g["params_mb"] for g in got), "peak_mb": max(g["peak_mb"] for g in got)})
    return rows


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
    ap.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds after one warm-up round")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "scale"), help="writes OUT.json and OUT.png")
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows: list[dict] = []
    for n in [p for p in args.procs if p > 1]:
        got = run(n, args)
        for r in got:  # speed-up against the single-process steps of the same job
            r["speedup"] = got[0]["step_s"] / r["step_s"]
        rows += got[1:] if rows else got  # one single-process row (the first job's)
    load1 = os.getloadavg()
    title = (f"MiniLM LoRA train step, global batch {args.batch}x{args.seq}, 1 thread per process, "
             f"{os.cpu_count()} CPU cores")
    print(f"\n{title}; load average {load0[0]:.1f} before, {load1[0]:.1f} after\n")
    print("| processes | wrapper | step (s) | speed-up vs 1 process | params per rank (MiB) | "
          "peak live tensors in a step, per rank (MiB) |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['procs']} | {LABEL[r['mode']]} | {r['step_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['params_mb']:.1f} | {r['peak_mb']:.0f} |")
    out = Path(args.out)
    meta = {"batch": args.batch, "seq": args.seq, "rounds": args.rounds, "cpu_count": os.cpu_count(),
            "loadavg_before": load0, "loadavg_after": load1, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"), f"{title}\nload average {load0[0]:.1f}-{load1[0]:.1f}, {meta['date']}")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
