"""Step time of LoRA training on the real all-MiniLM-L6-v2 vs number of processes (DDP and FSDP2, gloo, CPU).

Global batch G×S is split over N processes (each 1 torch thread), so N=2 on two idle cores should
take about half the time of N=1 plus the communication (adapter gradients all-reduced for DDP;
all-gather of every parameter + reduce-scatter of the adapter gradients for FSDP2). LoRA r=8 on
q/k/v/attention-out. Median of timed steps after warm-up.

    python benchmarks/bench_scale.py [--procs 1 2] [--batch 16] [--seq 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SPEC = "; ".join(f"attention.{t}:lora(r=8, alpha=16)" for t in ("self.query", "self.key", "self.value",
                                                                 "output.dense"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, mode: str, batch: int, seq: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    import lowrank_compiler as lrc
    from lowrank_compiler import distributed as lrcd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _minilm_task import load_minilm, make_batches

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
        fwd = lrcd.ddp(gm) if mode == "ddp" else lrcd.fsdp(gm)
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-4)
    gm.train()
    times = []
    for i in range(steps + 2):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss = fwd(ids, attention_mask=mask).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(str(statistics.median(times)))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, mode: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "t.txt")
        a = (world, _port(), mode, args.batch, args.seq, args.steps, out)
        if world == 1:
            worker(0, *a)
        else:
            torch.multiprocessing.spawn(worker, args=a, nprocs=world)
        return float(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    base = run(1, "single", args)
    rows = [("1", "single process", base)]
    for n in args.procs:
        if n > 1:
            for mode in ("ddp", "fsdp"):
                rows.append((str(n), mode, run(n, mode, args)))
    print(f"\nMiniLM LoRA train step, global batch {args.batch}x{args.seq}, 1 thread per process, "
          f"{os.cpu_count()} CPU cores\n")
    print("| processes | wrapper | step (s) | speed-up vs 1 process |\n|---|---|---|---|")
    for n, mode, t in rows:
        print(f"| {n} | {mode} | {t:.3f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
