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
  lrc.compile(gm) default   lrc.compile(gm) as a user calls it: the exact lowerings (lower_lora, lower_linear)
                            + inductor with exact dropout (torch's random ops, the eager stream: fallback_random)
  lrc compiled unlowered    lrc.compile(gm, lower=False): the graph as transformed, exact dropout (the
                            default before this issue's second session)
  lrc compiled inductor-rng   lrc.compile(gm, lower=False, exact_dropout=False): inductor's per-element Philox
  lrc compiled lowered +fused  lrc.compile(gm, lower=True, optimizer=opt): all lowerings + fused AdamW (the
                            fastest; opt-in: its dropout masks come from another random stream)
  and eval rows (forward, no_grad, eval mode): PEFT, lrc eager and lrc.compile(gm) default, ratio to PEFT eval.
Variants run round-robin (bench_lora.timed_rounds); ratios to PEFT eager of the median and of the minimum
per-iteration time over the rounds (the PNG shows both). With --compile a summary prints the default path
beside lrc eager, PEFT eager and the fastest train path, as ratios.
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
COMPILED = {  # compiled: lrc.compile's keyword arguments
    "lrc.compile(gm) default": (None, False, {}),
    "lrc compiled unlowered": (None, False, {"lower": False}),
    "lrc compiled inductor-rng": (None, False, {"lower": False, "exact_dropout": False}),
    "lrc compiled lowered +fused": ((), True, {"lower": True}),
}
EVAL = {"eval peft": (None, False, False), "eval lrc": (None, False, False), "eval lrc.compile(gm) default":
        (None, False, {})}  # forward only (no_grad, eval mode)


def step_fn(name: str, cfg: tuple, models: dict, ids: torch.Tensor, mask: torch.Tensor):
    skip, fused, compiled = cfg
    gm = models["lrc"]
    if name.endswith("peft"):
        model, params = models["peft"], [p for p in models["peft"].parameters() if p.requires_grad]
    else:
        params = [p for p in gm.parameters() if p.requires_grad]
        model = gm if skip is None else lower(gm, skip=skip)
    opt = torch.optim.AdamW(params, lr=1e-4)
    if compiled is not False:
        model = lrc.compile(gm, optimizer=opt if fused else None, **compiled)
    elif fused:
        fuse_optimizer(opt)
    if name.startswith("eval "):
        return bl.infer_fn(model, ids, mask)
    return bl.train_step_fn(model, ids, mask, opt)


def default_summary(ratios: dict[str, float], ratios_min: dict[str, float]) -> str:
    """The default path (``lrc.compile(gm)`` as a user calls it) beside lrc eager, PEFT eager and the fastest
    train path, as ratios of medians / of minima; empty without the compiled rows."""
    d, e = "lrc.compile(gm) default", "eval lrc.compile(gm) default"
    if d not in ratios or "lrc" not in ratios:
        return ""
    train = [k for k in ratios if not k.startswith("eval ")]
    fastest = min(train, key=lambda k: ratios_min[k])
    lines = ["lrc.compile(gm) as a user calls it (ratios of medians / of minima):",
             f"  train: {ratios[d]:.3f}x / {ratios_min[d]:.3f}x PEFT eager, {ratios[d] / ratios['lrc']:.3f}x / "
             f"{ratios_min[d] / ratios_min['lrc']:.3f}x lrc eager; fastest train path: {fastest} "
             f"{ratios[fastest]:.3f}x / {ratios_min[fastest]:.3f}x PEFT eager"]
    if e in ratios:
        lines.append(f"  eval:  {ratios[e]:.3f}x / {ratios_min[e]:.3f}x PEFT eager, {ratios[e] / ratios['eval lrc']:.3f}x"
                     f" / {ratios_min[e] / ratios_min['eval lrc']:.3f}x lrc eager")
    return "\n".join(lines)


def plot(path: Path, ratios: dict[str, float], ratios_min: dict[str, float], title: str) -> None:
    """Horizontal bars: ratio of the medians and ratio of the minima per variant, with the two targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ratios)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.9))
    y = range(len(names))
    for off, vals, label, alpha in ((0.2, ratios, "ratio of medians", 1.0), (-0.2, ratios_min, "ratio of minima", 0.55)):
        colors = ["tab:gray" if n.endswith("peft") else "tab:orange" if "compile" in n else "tab:blue" for n in names]
        ax.barh([i + off for i in y], [vals[n] for n in names], height=0.38, color=colors, alpha=alpha, label=label)
        for i, n in zip(y, names):
            ax.text(vals[n], i + off, f" {vals[n]:.3f}x", va="center", fontsize=7)
    ax.set_yticks(list(y), names)
    ax.axvline(0.90, ls="--", lw=1, color="tab:blue", label="target, eager: 0.90")
    ax.axvline(0.75, ls="--", lw=1, color="tab:orange", label="target, compiled: 0.75")
    ax.set_xlim(0, max(1.1, 1.12 * max(*ratios.values(), *ratios_min.values())))
    ax.set_xlabel("train step time / PEFT eager; eval rows: forward / PEFT's (lower is faster); dark: medians, "
                  "light: minima", fontsize=8)
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
    variants = {**VARIANTS, **(COMPILED if a.compile else {}), **(EVAL if a.compile else {})}
    if a.only:
        keep = {"peft", "lrc", "eval peft", "eval lrc", *a.only.split(",")}
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
    ref = {k: "eval peft" if k.startswith("eval ") else "peft" for k in med}
    ratios = {k: med[k] / med[ref[k]] for k in med}
    ratios_min = {k: best[k] / best[ref[k]] for k in best}
    print("train step (fwd + bwd + AdamW), ratio to PEFT eager: of the medians, and of the minima (load only\n"
          "ever slows a round down, so the minima are the less noisy estimate on a shared machine)")
    print(f"{'variant':<30} {'median ms':>10} {'min ms':>9} {'ratio':>7} {'ratio of min':>13}\n" + "-" * 73)
    for k in times:
        print(f"{k:<30} {1e3 * med[k]:>10.1f} {1e3 * best[k]:>9.1f} {ratios[k]:>6.3f}x {ratios_min[k]:>12.3f}x")
    summary = default_summary(ratios, ratios_min)
    if summary:
        print("\n" + summary)
    print(f"\n(setup, compilation and warm-up took {time.perf_counter() - t0:.0f} s)")
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({
        "setup": head, "command": "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "median_ms": {k: round(1e3 * v, 2) for k, v in med.items()}, "min_ms": {k: round(1e3 * v, 2) for k, v in best.items()},
        "ratio_to_peft": {k: round(v, 4) for k, v in ratios.items()},
        "ratio_of_min_to_peft": {k: round(v, 4) for k, v in ratios_min.items()},
    }, indent=1) + "\n")
    plot(out.with_suffix(".png"), ratios, ratios_min, head)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
