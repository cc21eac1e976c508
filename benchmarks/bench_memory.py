"""Training peak memory of one step on the real all-MiniLM-L6-v2, each variant in its own process, vs PEFT.

Step = forward + backward + AdamW step in train mode (BERT's attention and hidden dropout p=0.1 on), batch
16×128, LoRA r=8 alpha=16 dropout 0 on query/key/value/attention.output.dense. Variants:
  peft            PEFT eager (the reference)
  peft+gc         PEFT with HF ``gradient_checkpointing_enable()`` (non-reentrant): the checkpoint baseline
  lrc             lrc eager (transformed graph)
  lrc+attn        ``lower_memory(gm, dropout=False)``: dropout attention saves q, k, v + a 1-byte mask and
                  recomputes QKᵀ/softmax in backward
  lrc+attn-probs  ``attention="probs"``: saves the softmax output + the mask (no GEMM recomputed)
  lrc+attn-rng    ``mask="rng"``: saves the RNG state instead of the mask (redrawn in backward; not run by
                  default, ``--variants all``)
  lrc+lean        ``lower_memory(gm)`` (the defaults): lrc+attn and hidden dropouts keeping bool masks
  lrc+lean+ffn    ``ffn=True``: also gelu(frozen linear) keeps the linear's input, recomputing one GEMM per layer
  lrc+ckpt        ``attention=None, dropout=False, checkpoint=True``: each encoder layer recomputed in backward
  lrc+lean+ckpt   ``lower_memory(gm, checkpoint=True)``
Memory (one process per variant, after a warm-up step so model, grads and AdamW state already exist):
peak of live tensor bytes above the step's start (torch.profiler allocation events, exact, independent of
the allocator and of other processes), bytes autograd keeps for backward after the forward (distinct
storages seen by ``saved_tensors_hooks``), and the process peak RSS (VmHWM, reset via
/proc/self/clear_refs; glibc keeps freed blocks, so only indicative; Linux). Time: all variants in one
process, round-robin rounds, median step time as a ratio to PEFT (1 thread, this thread's CPU clock).
Writes docs/memory.json and docs/memory.png.

    flock /tmp/lrc-bench.lock python benchmarks/bench_memory.py [--rounds 3] [--variants peft,lrc,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
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

DOCS = HERE.parent / "docs"
LOWER = {"lrc": None, "lrc+attn": {"dropout": False}, "lrc+attn-probs": {"attention": "probs", "dropout": False},
         "lrc+attn-rng": {"mask": "rng", "dropout": False}, "lrc+lean": {}, "lrc+lean+ffn": {"ffn": True},
         "lrc+ckpt": {"attention": None, "dropout": False, "checkpoint": True}, "lrc+lean+ckpt": {"checkpoint": True}}
VARIANTS = ("peft", "peft+gc", *LOWER)
DEFAULT = [v for v in VARIANTS if v != "lrc+attn-rng"]


def build(names: list[str], batch: int, seq: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Only the models ``names`` need: {'lrc': gm, 'peft': ..., 'peft+gc': ...} (B ~ N(0, 0.01), seeded)."""
    from peft import LoraConfig, get_peft_model

    base, tok = bl.load_minilm()
    ids, mask = bl.make_inputs(tok.vocab_size, batch, seq)
    models = {}
    if any(n.startswith("lrc") for n in names):
        torch.manual_seed(0)
        models["lrc"] = lrc.transform(copy.deepcopy(base), bl.LRC_SPEC, example_inputs=(ids[:2],),
                                      example_kwargs={"attention_mask": mask[:2]})
        bl.randomize_b(dict(models["lrc"].named_parameters()))
    for name in ("peft", "peft+gc"):
        if name in names:
            torch.manual_seed(0)
            pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=bl.TARGETS))
            bl.randomize_b(dict(pm.named_parameters()))
            if name == "peft+gc":
                pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            models[name] = pm
    return models, ids, mask


def step_fn(name: str, models: dict, ids: torch.Tensor, mask: torch.Tensor):
    """One train step (fwd + bwd + AdamW) of variant ``name``; lowered graphs train ``gm``'s parameters."""
    if name.startswith("peft"):
        model = owner = models[name]
    else:
        owner = models["lrc"]
        model = owner if LOWER[name] is None else lrc.lower(owner, "memory", **LOWER[name])
    opt = torch.optim.AdamW([p for p in owner.parameters() if p.requires_grad], lr=1e-4)

    return bl.train_step_fn(model, ids, mask, opt), model, owner


def saved_bytes(model, owner, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Bytes of the distinct activation storages (not ``owner``'s weights) autograd keeps after one forward."""
    sizes: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in [*owner.parameters(), *owner.buffers()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            sizes[s.data_ptr()] = max(sizes.get(s.data_ptr(), 0), s.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = bl.hidden(model(ids, attention_mask=mask)).pow(2).mean()
    del loss
    return sum(sizes.values())


def memory_child(name: str, batch: int, seq: int, threads: int) -> dict:
    import gc

    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    models, ids, mask = build([name], batch, seq)
    step, model, owner = step_fn(name, models, ids, mask)
    step()  # optimizer state allocated, first-call caches warm
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    after = _status_kb("VmHWM")
    gc.collect()
    return {"name": name, "tensor_peak_kb": _peak_kb(prof), "saved_kb": saved_bytes(model, owner, ids, mask) // 1024,
            "rss_before_kb": before, "rss_peak_kb": after}


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


def timings(names: list[str], batch: int, seq: int, rounds: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    models, ids, mask = build(names, batch, seq)
    fns = {n: step_fn(n, models, ids, mask)[0] for n in names}
    print(f"  timing {len(fns)} variants, {rounds} rounds", file=sys.stderr)
    return bl.timed_rounds(fns, rounds, 1, 1, time.thread_time)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    if not rows[0].get("time_ratio"):
        fig, a = plt.subplots(figsize=(7, 4.2))
        b = None
    else:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = ["#999999" if n.startswith("peft") else "#3b75af" for n in names]
    a.barh(names, [r["tensor_peak_mib"] for r in rows], color=colors)
    a.axvline(0.85 * rows[0]["tensor_peak_mib"], color="#c44e52", ls="--", label="0.85× PEFT (target)")
    a.set_xlabel("peak live tensors in one train step (MiB)")
    a.invert_yaxis()
    a.legend(loc="lower right")
    if b is not None:
        b.barh(names, [r["time_ratio"] for r in rows], color=colors)
        b.axvline(1.0, color="black", lw=0.8)
        b.set_xlabel("step time / PEFT (1 thread, CPU clock)")
        b.invert_yaxis()
        b.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (0: memory only)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="threads of each memory process")
    ap.add_argument("--jobs", type=int, default=2, help="memory processes run side by side")
    ap.add_argument("--variants", default=",".join(DEFAULT), help="comma-separated, or 'all'")
    ap.add_argument("--out", default=str(DOCS / "memory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(memory_child(a.child, a.batch, a.seq, a.threads)))
        return
    names = list(VARIANTS) if a.variants == "all" else [n for n in a.variants.split(",") if n]
    bad = [n for n in names if n not in VARIANTS]
    if bad or names[:1] != ["peft"]:
        ap.error(f"variants must start with peft and be among {', '.join(VARIANTS)} (got {a.variants})")
    t0 = time.time()
    rows = {}
    for i in range(0, len(names), a.jobs):  # tensor bytes do not depend on what runs beside a process
        procs = {n: subprocess.Popen([sys.executable, __file__, "--child", n, "--batch", str(a.batch), "--seq",
                                      str(a.seq), "--threads", str(a.threads)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for n in names[i:i + a.jobs]}
        for name, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"variant {name} failed:\n{err[-3000:]}")
            rows[name] = json.loads(out.strip().splitlines()[-1])
            print(f"  {name}: measured ({time.time() - t0:.0f} s)", file=sys.stderr)
    rows = [rows[n] for n in names]
    times = timings(names, a.batch, a.seq, a.rounds) if a.rounds else {}
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = rows[0]
    for r in rows:
        r.update(tensor_peak_mib=round(r["tensor_peak_kb"] / 1024, 1), saved_mib=round(r["saved_kb"] / 1024, 1),
                 vs_peft=round(r["tensor_peak_kb"] / ref["tensor_peak_kb"], 3),
                 rss_peak_mib=round(r["rss_peak_kb"] / 1024), rss_growth_mib=round((r["rss_peak_kb"] - r["rss_before_kb"]) / 1024),
                 step_ms=round(1e3 * med[r["name"]], 1) if med else None,
                 time_ratio=round(med[r["name"]] / med["peft"], 3) if med else None)
    load = os.getloadavg()
    title = f"one training step, MiniLM {a.batch}x{a.seq}, LoRA r=8 q/k/v/attn-out, dropout on, AdamW"
    lines = [title + f"; torch {torch.__version__}; load average {load[0]:.1f} / {load[1]:.1f}", "",
             "| variant | peak live tensors (MiB) | vs PEFT | saved for backward (MiB) | step time vs PEFT "
             "| peak RSS (MiB) | RSS growth in the step (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tr = f"{r['time_ratio']:.2f}x" if r["time_ratio"] else "-"
        lines.append(f"| {r['name']} | {r['tensor_peak_mib']:.0f} | {r['vs_peft']:.2f}x | {r['saved_mib']:.0f} | {tr} "
                     f"| {r['rss_peak_mib']} | {r['rss_growth_mib']} |")
    print("\n".join(lines))
    args = " ".join(x for x in sys.argv[1:] if x != a.out and not x.startswith("--out"))
    meta = {"command": f"flock /tmp/lrc-bench.lock python benchmarks/bench_memory.py {args}".strip(), "torch": torch.__version__,
            "loadavg": [round(x, 2) for x in load], "batch": a.batch, "seq": a.seq, "rounds": a.rounds}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, Path(a.out).with_suffix(".png"), title)


if __name__ == "__main__":
    main()
