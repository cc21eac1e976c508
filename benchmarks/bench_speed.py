"""Training-speed passes on the real all-MiniLM-L6-v2: what each one buys, vs PEFT eager, in one run.

Train step = forward + backward + AdamW step (train mode: BERT's hidden and attention dropout 0.1 on),
batch 16×128, LoRA r=8 alpha=16 (adapter dropout 0) on query/key/value/attention.output.dense, the same
AdamW (lr 1e-4, torch's default foreach step unless the row says fused). Variants:
  peft                      PEFT eager (the reference)
  lrc                       lrc eager: the transformed graph as lrc.transform returns it
  lrc +lora                 lrc.lower(skip=linear,dropout): lowerings/fast_lora.py only
  lrc +lora+linear          + lowerings/fast_linear.py
  lrc lowered               + lowerings/fast_dropout.py (all lowerings: lrc.lower)
  lrc lowered +fused opt    the same with lrc.compile's fused optimizer step
  --compile adds (inductor, forward + backward; compile time excluded, warm-up steps run first):
  lrc.compile(gm) default   lrc.compile(gm) as a user calls it: the unlowered graph, exact dropout (torch's
                            random ops, the eager stream: inductor's fallback_random)
  lrc compiled inductor-rng   lrc.compile(gm, exact_dropout=False): inductor's per-element Philox dropout
  lrc compiled lowered +fused  lrc.compile(gm, lower=True, optimizer=opt): lowered graph + fused AdamW (the
                            fastest; opt-in: its dropout masks come from another random stream)
Variants run round-robin (bench_lora.timed_rounds); ratios to PEFT eager of the median and of the minimum
per-iteration time over the rounds (the PNG shows both).
The clock: ``cpu`` (default) = this thread's CPU time with 1 torch thread (robust on a shared machine);
``wall`` = perf_counter with ``--threads`` threads (inductor's OpenMP kernels and oneDNN use them).
Prints the table, writes docs/speed.json and docs/speed.png (bar chart of the ratios).

    python benchmarks/bench_speed.py [--rounds 5] [--compile] [--clock wall --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import bench_lora as bl  # noqa: E402

import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.backends.torch_compile import fuse_optimizer  # noqa: E402
from lowrank_compiler.lowerings import lower  # noqa: E402

DOCS = HERE.parent / "docs"
VARIANTS = {  # name -> (lowerings skipped or None for the unlowered graph, fused optimizer, compiled)
    "peft": (None, False, False),
    "lrc": (None, False, False),
    "lrc +lora": (("linear", "dropout"), False, False),
    "lrc +lora+linear": (("dropout",), False, False),
    "lrc lowered": ((), False, False),
    "lrc lowered +fused opt": ((), True, False),
}
COMPILED = {  # compiled: True, or "philox" for inductor's own dropout random stream
    "lrc.compile(gm) default": (None, False, True),
    "lrc compiled inductor-rng": (None, False, "philox"),
    "lrc compiled lowered +fused": ((), True, True),
}


def step_fn(name: str, cfg: tuple, models: dict, ids: torch.Tensor, mask: torch.Tensor):
    skip, fused, compiled = cfg
    gm = models["lrc"]
    if name == "peft":
        model, params = models["peft"], [p for p in models["peft"].parameters() if p.requires_grad]
    else:
        params = [p for p in gm.parameters() if p.requires_grad]
        model = gm if skip is None else lower(gm, skip=skip)
    opt = torch.optim.AdamW(params, lr=1e-4)
    if compiled:
        model = lrc.compile(gm, lower=skip is not None, optimizer=opt if fused else None,
                            exact_dropout=compiled != "philox")
    elif fused:
        fuse_optimizer(opt)
    return bl.train_step_fn(model, ids, mask, opt)


def plot(path: Path, ratios: dict[str, float], ratios_min: dict[str, float], title: str) -> None:
    """Horizontal bars: ratio of the medians and ratio of the minima per variant, with the two targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ratios)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.9))
    y = range(len(names))
    for off, vals, label, alpha in ((0.2, ratios, "ratio of medians", 1.0), (-0.2, ratios_min, "ratio of minima", 0.55)):
        colors = ["tab:gray" if n == "peft" else "tab:orange" if "compiled" in n else "tab:blue" for n in names]
        ax.barh([i + off for i in y], [vals[n] for n in names], height=0.38, color=colors, alpha=alpha, label=label)
        for i, n in zip(y, names):
            ax.text(vals[n], i + off, f" {vals[n]:.3f}x", va="center", fontsize=7)
    ax.set_yticks(list(y), names)
    ax.axvline(0.90, ls="--", lw=1, color="tab:blue", label="target, eager: 0.90")
    ax.axvline(0.75, ls="--", lw=1, color="tab:orange", label="target, compiled: 0.75")
    ax.set_xlim(0, max(1.1, 1.12 * max(*ratios.values(), *ratios_min.values())))
    ax.set_xlabel("train step time / PEFT eager (lower is faster); dark: medians, light: minima")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=7, frameon=False)
    ax.set_title(title.replace(", load", "\nload", 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                    help="cpu (default): this thread's CPU time with 1 thread, robust on a shared machine")
    ap.add_argument("--compile", action="store_true", help="add the inductor rows (compiles for minutes)")
    ap.add_argument("--only", default=None, help="comma-separated variant names (peft is always run)")
    ap.add_argument("--out", default=str(DOCS / "speed"), help="path stem of the .json and .png written")
    a = ap.parse_args(argv)
    if a.clock == "cpu":
        a.threads = 1
    torch.set_num_threads(a.threads)
    variants = {**VARIANTS, **(COMPILED if a.compile else {})}
    if a.only:
        keep = {"peft", *a.only.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep}
    base, tok = bl.load_minilm()
    ids, mask = bl.make_inputs(tok.vocab_size, a.batch, a.seq)
    models = bl.build(base, ids, mask)
    t0 = time.perf_counter()
    fns = {n: step_fn(n, cfg, models, ids, mask) for n, cfg in variants.items()}
    warm = 3 if a.compile else 2  # compiled: the first call compiles, the second may recompile for train()
    times = bl.timed_rounds(fns, a.rounds, 2, warm, time.thread_time if a.clock == "cpu" else time.perf_counter)
    load = os.getloadavg()
    head = (f"MiniLM train step {a.batch}x{a.seq}, {a.threads} thread(s), {a.clock} clock, torch {torch.__version__}, "
            f"{a.rounds} rounds, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(head + "\n")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratios = {k: med[k] / med["peft"] for k in med}
    print("train step (fwd + bwd + AdamW), ratio to PEFT eager: of the medians, and of the minima (load only\n"
          "ever slows a round down, so the minima are the less noisy estimate on a shared machine)")
    print(f"{'variant':<30} {'median ms':>10} {'min ms':>9} {'ratio':>7} {'ratio of min':>13}\n" + "-" * 73)
    for k in times:
        print(f"{k:<30} {1e3 * med[k]:>10.1f} {1e3 * best[k]:>9.1f} {ratios[k]:>6.3f}x {best[k] / best['peft']:>12.3f}x")
    print(f"\n(setup, compilation and warm-up took {time.perf_counter() - t0:.0f} s)")
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({
        "setup": head, "command": "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "median_ms": {k: round(1e3 * v, 2) for k, v in med.items()}, "min_ms": {k: round(1e3 * v, 2) for k, v in best.items()},
        "ratio_to_peft": {k: round(v, 4) for k, v in ratios.items()},
        "ratio_of_min_to_peft": {k: round(best[k] / best["peft"], 4) for k in best},
    }, indent=1) + "\n")
    plot(out.with_suffix(".png"), ratios, {k: best[k] / best["peft"] for k in best}, head)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
