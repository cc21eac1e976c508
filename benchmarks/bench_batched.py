"""Mixed-adapter batches on the real all-MiniLM-L6-v2: one call for a batch whose rows use K different
LoRA adapters, vs PEFT's ``adapter_names=`` loop and vs K separate runs (torch and ONNX Runtime, CPU).

Batch of 32 rows, row i uses adapter i mod K (K = 1, 4, 16); LoRA r=8, alpha=16 on query/key/value/
attention.output.dense in every layer (24 sites), different random weights per adapter; eval + no_grad.
Variants (same adapters, outputs checked equal first):
  lrc mixed       ``lrc.adapter_sets.mixed_batch`` graph, one call with ``adapter_ids`` (gather + batched matmul)
  peft names      PEFT ``model(..., adapter_names=[...])`` (a masked loop over adapters at every layer)
  lrc K runs      ``set_adapter`` then the rows of that adapter, K calls
  ort mixed       the mixed graph in ONNX Runtime, ONE ``Run()`` with ``adapter_ids``
  ort K runs      the separate-adapter ONNX model, K ``Run()``s each with that adapter's LoRA inputs
Round-robin timed blocks, median per-iteration *process CPU time* over rounds (the host's 2 cores are
shared, so wall time mostly measures the neighbours; one thread makes CPU time the work done);
throughput = 32 / time. seq 1 is the decode-like serving case (one token per row), seq 32 a prefill.

    python benchmarks/bench_batched.py [--rounds 5] [--seqs 1 32] [--ks 1 4 16] [--out docs]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lowrank_compiler
from bench_lora import LRC_SPEC, TARGETS, hidden, load_minilm, make_inputs, timed_rounds  # noqa: E402

import lowrank_compiler as lrc  # noqa: E402

BATCH = 32


def inputs(vocab: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bench_lora's right-padded batch, every row keeping at least one token (seq 1 would give empty rows)."""
    ids, mask = make_inputs(vocab, BATCH, seq)
    mask[:, 0] = 1
    return ids, mask
LABELS = {"lrc_mixed": "lrc mixed (1 call)", "peft": "peft adapter_names", "lrc_k": "lrc K runs",
          "ort_mixed": "ort mixed (1 Run)", "ort_k": "ort K runs"}


def build(base: torch.nn.Module, k: int, ids: torch.Tensor, mask: torch.Tensor):
    """(lrc gm with K named sets, PEFT model with the same K adapters, names)."""
    import peft

    names = ["default"] + [f"a{i}" for i in range(1, k)]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    gm = lrc.transform(base, LRC_SPEC, example_inputs=(ids, mask), progress=False)
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        lrc.adapter_sets.add_adapter(gm, n, LRC_SPEC)
    torch.manual_seed(0)
    layers = {name: mod for name, mod in pm.base_model.model.named_modules() if hasattr(mod, "lora_A")}
    with torch.no_grad():
        for n in names:
            lrc.adapter_sets.set_adapter(gm, n)
            for site, ad in lrc.adapters(gm).items():
                lay = layers[site]
                lay.lora_B[n].weight.normal_(0, 0.02)
                ad.lora_A.copy_(lay.lora_A[n].weight)
                ad.lora_B.copy_(lay.lora_B[n].weight)
    lrc.adapter_sets.set_adapter(gm, "default")
    return gm, pm.eval(), names


def ort_models(gm, mgm, names, ids, mask, tmp: Path, threads: int):
    """(mixed session, separate-adapter session, {name: LoRA feeds})."""
    from lowrank_compiler.backends.onnx.adapters import lora_adapter_tensors
    from lowrank_compiler.backends.onnx.export import export_onnx, session
    from lowrank_compiler.backends.onnx.mixed import export_mixed_onnx

    export_mixed_onnx(mgm, tmp / "mixed.onnx", validate=False)
    export_onnx(gm, tmp / "sep.onnx", merge=False, validate=False)
    feeds = {}
    for n in names:
        lrc.adapter_sets.set_adapter(gm, n)
        feeds[n] = lora_adapter_tensors(gm)
    lrc.adapter_sets.set_adapter(gm, "default")
    return (session(tmp / "mixed.onnx", providers="cpu", threads=threads),
            session(tmp / "sep.onnx", providers="cpu", threads=threads), feeds)


def run_k(rounds: int, seqs: list[int], k: int, base, threads: int, tmp: Path
          ) -> tuple[dict[int, dict[str, list[float]]], list[str]]:
    """Per-iteration CPU seconds of every variant for K adapters, at each sequence length."""
    from lowrank_compiler.adapter_sets.mixed import adapter_ids, mixed_batch

    ids, mask = inputs(base.config.vocab_size, max(seqs))
    gm, pm, names = build(base, k, ids, mask)
    rows = [names[i % k] for i in range(BATCH)]
    mgm = mixed_batch(gm, names).eval()
    aid = adapter_ids(mgm, rows)
    groups = {n: torch.tensor([i for i, r in enumerate(rows) if r == n]) for n in names}
    s_mixed, s_sep, feeds = ort_models(gm, mgm, names, ids, mask, tmp, threads)
    out, parities = {}, []
    for seq in seqs:
        ids, mask = inputs(base.config.vocab_size, seq)
        np_in = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

        def lrc_k(ids=ids, mask=mask):
            for n, g in groups.items():
                lrc.adapter_sets.set_adapter(gm, n)
                gm(ids[g], mask[g])
            lrc.adapter_sets.set_adapter(gm, "default")

        def ort_k(np_in=np_in):
            for n, g in groups.items():
                s_sep.session.run(None, {"input_ids": np_in["input_ids"][g.numpy()],
                                         "attention_mask": np_in["attention_mask"][g.numpy()], **feeds[n]})

        fns = {
            "base": lambda ids=ids, mask=mask: base(input_ids=ids, attention_mask=mask),
            "lrc_mixed": lambda ids=ids, mask=mask: mgm(ids, mask, aid),
            "peft": lambda ids=ids, mask=mask: pm(input_ids=ids, attention_mask=mask, adapter_names=rows),
            "lrc_k": lrc_k,
            "ort_mixed": lambda np_in=np_in: s_mixed.session.run(None, {**np_in, "adapter_ids": aid.numpy()}),
            "ort_k": ort_k,
        }
        with torch.no_grad():
            ref = hidden(pm(input_ids=ids, attention_mask=mask, adapter_names=rows))
            ours = hidden(mgm(ids, mask, aid))
            ort = torch.from_numpy(fns["ort_mixed"]()[0])
            parities.append(f"K={k} seq={seq}: max |lrc mixed − peft| {float((ours - ref).abs().max()):.1e}, "
                            f"|ort mixed − peft| {float((ort - ref).abs().max()):.1e}")
            print(parities[-1], flush=True)
            out[seq] = timed_rounds(fns, rounds, iters=3 if seq > 8 else 10, warmup=1, clock=time.process_time)
    return out, parities


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for bench_batched.json / .png (default: print only)")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from <out>/bench_batched.json")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads((Path(args.out) / "bench_batched.json").read_text())["median_cpu_s"]
        plot({int(s): {int(k): v for k, v in by_k.items()} for s, by_k in saved.items()},
             Path(args.out) / "batched_throughput.png")
        return
    torch.set_num_threads(args.threads)
    base, _ = load_minilm()
    results: dict[int, dict[int, dict[str, float]]] = {s: {} for s in args.seqs}
    parities = []
    with tempfile.TemporaryDirectory() as d:
        for k in args.ks:
            times, par = run_k(args.rounds, args.seqs, k, base, args.threads, Path(d))
            parities += par
            for seq, t in times.items():
                results[seq][k] = {v: statistics.median(x) for v, x in t.items()}
    text = []
    for seq, by_k in results.items():
        text += ["", f"MiniLM-L6, batch {BATCH} x seq {seq}, LoRA r=8 on 24 sites, {args.threads} CPU thread(s), "
                 "process CPU time; rows/s (median) and speed vs PEFT adapter_names",
                 f"{'K':>3} {'base model':>12} " + " ".join(f"{LABELS[v]:>20}" for v in LABELS)]
        for k, med in by_k.items():
            text.append(f"{k:>3} {BATCH / med['base']:>12.0f} " + " ".join(
                f"{BATCH / med[v]:>12.0f} ({med['peft'] / med[v]:>4.2f}x)" for v in LABELS))
    print("\n".join(text))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_batched.json").write_text(json.dumps(
            {"batch": BATCH, "threads": args.threads, "parity": parities, "table": text,
             "median_cpu_s": {str(s): {str(k): v for k, v in by_k.items()} for s, by_k in results.items()}}, indent=1))
        plot(results, out / "batched_throughput.png")
        print(f"wrote {out / 'bench_batched.json'} and {out / 'batched_throughput.png'}")


def plot(results: dict[int, dict[int, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (seq, by_k) in zip(axes[0], results.items()):
        ks = list(by_k)
        width = 0.8 / len(LABELS)
        for j, v in enumerate(LABELS):
            ax.bar([i + j * width for i in range(len(ks))], [by_k[k]["peft"] / by_k[k][v] for k in ks], width,
                   label=LABELS[v])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ks))], [f"K = {k}" for k in ks])
        ax.set_ylabel("throughput vs PEFT adapter_names (higher is better)")
        ax.set_title(f"batch {BATCH} x seq {seq}, MiniLM-L6, 1 CPU thread")
        ax.set_ylim(0, 1.3 * max(by_k[k]["peft"] / by_k[k][v] for k in ks for v in LABELS))
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
