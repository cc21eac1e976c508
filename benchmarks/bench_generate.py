"""Decode speed with a KV cache: torch eager base, lrc (unmerged / merged), PEFT, ONNX Runtime (merged / adapter).

A small Llama from a stock config (random weights; hidden 256, 4 layers, vocab 2000), LoRA r=8 on
attention + MLP. Each variant greedy-generates ``--new`` tokens after a ``--prompt``-token prompt
(no eos, so every run produces the same count), at batch 1 and 8. Variants run round-robin, one
timed generation each per round; the median per-run time over rounds gives tokens/s, reported as
a ratio to the torch eager base model (same machine, same run). Writes a markdown table and a PNG.

    python benchmarks/bench_generate.py [--rounds 5] [--new 32] [--prompt 16] [--out docs]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lowrank_compiler
import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.backends.onnx.export import OrtSession  # noqa: E402
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx, ort_generate  # noqa: E402

SPEC = "self_attn.*:lora(r=8, alpha=16); mlp.*:lora(r=8, alpha=16)"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=2000, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval()


def _session(path: Path, threads: int) -> OrtSession:
    """A CPU session on ``threads`` threads that does not spin between runs (spinning ORT threads would
    steal the cores from the torch variants that run next)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return OrtSession(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))


def variants(tmp: Path, new: int, threads: int) -> dict[str, Callable[[dict[str, torch.Tensor]], object]]:
    from peft import PeftModel

    model = build()
    base = copy.deepcopy(model)
    peft_base = copy.deepcopy(model)
    gm = lrc.transform(model, SPEC).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    lrc.export(gm, tmp / "peft", format="peft")
    pm = PeftModel.from_pretrained(peft_base, tmp / "peft").eval()
    merged = lrc.merge(gm).eval()
    export_decoder_onnx(merged, tmp / "merged.onnx", merge=True, validate=False)
    export_decoder_onnx(gm, tmp / "sep.onnx", merge=False, adapters_dir=tmp, adapter_name="a", validate=False)
    s_merged, s_sep = _session(tmp / "merged.onnx", threads), _session(tmp / "sep.onnx", threads)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return {
        "torch eager base": lambda b: base.generate(**b, **kw),
        "lrc unmerged": lambda b: gm.generate(**b, **kw),
        "lrc merged": lambda b: merged.generate(**b, **kw),
        "PEFT unmerged": lambda b: pm.generate(**b, **kw),
        "ORT merged": lambda b: ort_generate(s_merged, b["input_ids"], b["attention_mask"], max_new_tokens=new),
        "ORT adapter active": lambda b: ort_generate(s_sep, b["input_ids"], b["attention_mask"], max_new_tokens=new,
                                                     adapter=tmp / "a.onnx_adapter"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate."))
    fns = variants(tmp, a.new, a.threads)
    results: dict[int, dict[str, float]] = {}
    for bs in (1, 8):
        g = torch.Generator().manual_seed(bs)
        b = {"input_ids": torch.randint(3, 2000, (bs, a.prompt), generator=g),
             "attention_mask": torch.ones(bs, a.prompt, dtype=torch.long)}
        for fn in fns.values():  # warm-up: traces the signatures, loads adapters
            fn(b)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(b)
                times[name].append(time.perf_counter() - t)
        results[bs] = {k: bs * a.new / statistics.median(v) for k, v in times.items()}
    base = {bs: r["torch eager base"] for bs, r in results.items()}
    lines = [f"Decode with KV cache, Llama hidden 256 x 4 layers, LoRA r=8 on attention+MLP, prompt {a.prompt}, "
             f"{a.new} new tokens, CPU {a.threads} threads, median of {a.rounds} rounds", "",
             "| variant | tok/s b=1 | ratio b=1 | tok/s b=8 | ratio b=8 |", "|---|---:|---:|---:|---:|"]
    for k in fns:
        lines.append(f"| {k} | {results[1][k]:.0f} | {results[1][k] / base[1]:.2f} | {results[8][k]:.0f} | "
                     f"{results[8][k] / base[8]:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_generate.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        names = list(fns)
        for i, bs in enumerate((1, 8)):
            ax.bar([j + 0.4 * i for j in range(len(names))], [results[bs][k] / base[bs] for k in names], width=0.4,
                   label=f"batch {bs}")
        ax.set_xticks([j + 0.2 for j in range(len(names))], names, rotation=20, ha="right", fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("tokens/s ÷ torch eager base")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_generate.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no PNG")


if __name__ == "__main__":
    main()
