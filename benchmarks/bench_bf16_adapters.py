"""bf16 base, bf16 vs fp32 adapter parameters: the loss curve at tiny size against an all-fp32 reference (issue 22).

A stock tiny ``LlamaConfig`` (random weights), LoRA r=8 on q/v, AdamW, a fixed batch the model learns to
continue (next token = token + 1 mod vocab). Three runs from the same weights and adapter init:
``fp32`` (model and adapters fp32: the reference), ``bf16 adapters`` (adapters cast to the base dtype: lrc's
behaviour before fp32 master weights), ``fp32 adapters`` (bf16 base, adapter parameters and AdamW state fp32:
what ``lora`` now creates on a bf16 / fp16 base, as PEFT's ``autocast_adapter_dtype``).

    python benchmarks/bench_bf16_adapters.py --steps 200 --lr 1e-4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lowrank_compiler as lrc  # noqa: E402

SPEC = "self_attn.q_proj:lora(r=8, alpha=16); self_attn.v_proj:lora(r=8, alpha=16)"


def run(base_dtype: torch.dtype, adapter_dtype: torch.dtype | None, steps: int, lr: float) -> list[float]:
    """Loss per step; ``adapter_dtype``: cast the adapters to it (None: as lrc creates them)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).to(base_dtype)
    x = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    y = (x + 1) % 128
    gm = lrc.transform(model, SPEC, example_inputs=(x,))
    if adapter_dtype is not None:
        for mod in lrc.adapters(gm).values():
            mod.to(adapter_dtype)
    torch.manual_seed(2)
    with torch.no_grad():  # the same adapter init in every run (drawn in fp32, then cast)
        for n, p in gm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape) * (0.02 if "lora_A" in n else 0.0))
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = gm(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    ap.add_argument("--out", default=str(HERE / "results" / "bf16_adapters.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    res: dict[str, dict[str, list[float]]] = {}
    for lr in a.lr:
        runs = {"fp32": run(torch.float32, None, a.steps, lr),
                "bf16 adapters": run(torch.bfloat16, torch.bfloat16, a.steps, lr),
                "fp32 adapters": run(torch.bfloat16, torch.float32, a.steps, lr)}
        res[str(lr)] = runs
        ref = runs["fp32"]
        for k, v in runs.items():
            gap = max(abs(p - q) for p, q in zip(v, ref))
            print(f"lr {lr:g} {k:14s} loss {v[0]:.4f} -> {v[-1]:.4f} (drop {v[0] - v[-1]:.4f}); "
                  f"max |loss - fp32 loss| {gap:.4f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "loadavg": open("/proc/loadavg").read().split()[:3],
                                       "losses": res}, indent=1))


if __name__ == "__main__":
    main()
