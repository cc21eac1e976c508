"""Quantized decoders (issue 23): fp32 vs int8 vs int4 ``--format genai`` folders of one Llama- or Qwen2-shaped
model (random weights, LoRA r=8 on attention + MLP): folder size, decode tokens/s of lrc's ORT loop and of
onnxruntime-genai (base and with the adapter), and each quantized folder's gate. The unquantized engines side by
side: ``bench_decode.py``. State the machine load (printed) next to any number.

    python benchmarks/bench_decode_quantized.py [--hidden 512 --layers 4]   # fp32 vs int8 vs int4 (issue 23)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lowrank_compiler
import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.backends.onnx.export import session  # noqa: E402
from lowrank_compiler.backends.onnx.generate import next_tokens  # noqa: E402

SPEC = "self_attn.*:lora(r=8, alpha=16); mlp.*:lora(r=8, alpha=16)"


def build(kind: str, hidden: int, layers: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    cfg = cfg_cls(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=2000, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model_cls(cfg).eval()


def ort_loop(sess, ids: np.ndarray, new: int, adapter) -> tuple[float, float]:
    """(prefill s, decode s) of lrc's loop (``ort_generate``'s steps, timed apart)."""
    b = ids.shape[0]
    pasts = {i.name: i for i in sess.get_inputs() if i.name.startswith("past.")}
    state = {n: np.zeros((b, int(i.shape[1]), 0, int(i.shape[3])), np.float32) for n, i in pasts.items()}
    mask, step, pos = np.ones_like(ids), ids, np.arange(ids.shape[1])[None].repeat(b, 0)
    t0 = time.perf_counter()
    prefill = 0.0
    for k in range(new):
        res = sess({"input_ids": step, "attention_mask": mask, "position_ids": pos[:, -step.shape[1]:], **state},
                   adapter=adapter)
        nxt = next_tokens(res[0][:, -1])
        state = {n.replace("present.", "past."): v for n, v in zip(sess.output_names[1:], res[1:])}
        step, mask = nxt[:, None], np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        pos = np.concatenate([pos, pos[:, -1:] + 1], 1)
        if k == 0:
            prefill = time.perf_counter() - t0
    return prefill, time.perf_counter() - t0 - prefill


def genai_loop(og, model, ads, ids: np.ndarray, new: int, adapter) -> tuple[float, float]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, batch_size=ids.shape[0])
    g = og.Generator(model, params)
    if adapter:
        g.set_active_adapter(ads, adapter)
    t0 = time.perf_counter()
    g.append_tokens(ids.astype(np.int32))  # prefill runs here in 0.18
    g.generate_next_token()
    prefill = time.perf_counter() - t0
    while not g.is_done():
        g.generate_next_token()
    return prefill, time.perf_counter() - t0 - prefill


def main_quantized() -> None:
    """fp32 vs int8 vs int4 genai folders of one model (issue 23): folder size, decode tokens/s at
    batch 1 in lrc's ORT loop and in onnxruntime-genai, base and with the fp32 adapter active, and each
    quantized folder's gate (logits cosine, greedy agreement on held-out prompts vs the fp32 graph)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="llama", choices=("llama", "qwen2"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import onnxruntime_genai as og

    torch.set_num_threads(a.threads)
    gm = lrc.transform(build(a.kind, a.hidden, a.layers), SPEC)
    with torch.no_grad():
        for mod in lrc.adapters(gm).values():
            mod.lora_B.normal_(0, 0.02)
    root = Path(tempfile.mkdtemp())
    folders, gates = {}, {}
    for mode in ("fp32", "int8", "int4"):
        folders[mode] = root / mode
        rep = lrc.export(gm, folders[mode], format="genai", adapter_name="task", validate=False,
                         quantize=None if mode == "fp32" else mode, force=True)
        gates[mode] = rep.get("gate")
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}; {os.cpu_count()} CPUs; {a.kind} hidden "
          f"{a.hidden} x {a.layers} layers (random weights), prompt {a.prompt}, {a.new} new tokens, batch 1, "
          f"{a.threads} thread(s)")
    ids = np.random.default_rng(0).integers(3, 2000, (1, a.prompt)).astype(np.int64)
    runs, sizes = {}, {}
    for mode, out in folders.items():
        sizes[mode] = sum(f.stat().st_size for f in out.glob("model.onnx*"))
        sess = session(out / "model.onnx", providers="cpu", threads=a.threads)
        model = og.Model(str(out))
        ads = og.Adapters(model)
        ads.load(str(out / "adapters" / "task.onnx_adapter"), "task")
        ad = out / "adapters" / "task.onnx_adapter"
        runs[(mode, "lrc ORT loop", "base")] = lambda s=sess: ort_loop(s, ids, a.new, None)
        runs[(mode, "lrc ORT loop", "adapter")] = lambda s=sess, ad=ad: ort_loop(s, ids, a.new, ad)
        runs[(mode, "onnxruntime-genai", "base")] = lambda m=model, x=ads: genai_loop(og, m, x, ids, a.new, None)
        runs[(mode, "onnxruntime-genai", "adapter")] = lambda m=model, x=ads: genai_loop(og, m, x, ids, a.new, "task")
    times: dict[tuple[str, str, str], list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(a.rounds):
        for k, fn in runs.items():
            times[k].append(fn()[1])
    print("| weights | model.onnx + data MB | engine | adapter | decode tok/s | vs fp32 | gate: logits cos / agreement |")
    print("|---|---:|---|---|---:|---:|---|")
    for (mode, engine, which), ts in times.items():
        tps = (a.new - 1) / statistics.median(ts)
        ref = (a.new - 1) / statistics.median(times[("fp32", engine, which)])
        g = gates[mode]
        gate = "" if g is None else f"{g['cosine']:.5f} / {g['agreement']:.2f}"
        print(f"| {mode} | {sizes[mode] / 1e6:.1f} | {engine} | {which} | {tps:.0f} | {tps / ref:.2f}x | {gate} |")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main_quantized()
