"""A decoder at the size users fine-tune: lrc vs PEFT vs the bare HF model, phase by phase (issue 22).

Default model: the TinyLlama-1.1B shape (stock ``LlamaConfig``: 22 layers, hidden 2048, 32 heads, 4 kv heads,
intermediate 5632, vocab 32000, random weights); ``--layers N`` keeps the shape with fewer layers,
``--config DIR_OR_JSON`` takes any HF causal-LM config. LoRA r=16 on q/v for lrc and PEFT.

Phases (each variant, each phase in its own subprocess so peaks are clean; variants interleaved):
transform, first call (forward + backward with labels), train step (mean of the next steps),
generate (greedy tokens/s, batch 1), save, load, export (ONNX decode graph, adapters separate,
external data). Peak = VmHWM after a reset minus the RSS just before the phase, as a multiple of the
weights' bytes W (load: of the file's size). These phases run with the trace cache off (``LRC_TRACE_CACHE=0``:
every process traces, the cost before issue 22's cache).

Trace cache (issue 22): ``first_call_cold`` and ``first_call_warm`` time ``transform`` and the first
``labels`` step in a first process (empty cache folder, which it fills) and then a second one (the
folder the first filled): the cost a script pays on its first run and on every later run.

    python benchmarks/bench_llm.py                     # 1.1B, fp32 (≈ 6 GB per process; 24 GB machine)
    python benchmarks/bench_llm.py --layers 4          # the same shape, 4 layers (development, CI's slow test)
    python benchmarks/bench_llm.py --dtype bf16 --phases generate save load
    python benchmarks/bench_llm.py --layers 4 --phases first_call_cold first_call_warm
    python benchmarks/bench_llm.py --phases train_step --variants lrc peft --rounds 4 --steps 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.helpers.memory import run_phase  # noqa: E402  (the subprocess + VmHWM harness the slow test uses)

PHASES = ("transform", "first_call", "train_step", "generate", "save", "load", "export", "first_call_cold",
          "first_call_warm")
CACHED = ("first_call_cold", "first_call_warm")  # the phases that use the trace cache (the others: LRC_TRACE_CACHE=0)
VARIANTS = ("lrc", "peft", "hf")
SPEC = "self_attn.q_proj:lora(r=16, alpha=32); self_attn.v_proj:lora(r=16, alpha=32)"

BUILD = '''
from pathlib import Path
import transformers as tf
ARGS = {args!r}
if ARGS["config"]:
    cfg = tf.AutoConfig.from_pretrained(ARGS["config"]) if os.path.isdir(ARGS["config"]) else \\
        tf.LlamaConfig.from_json_file(ARGS["config"])
else:
    cfg = tf.LlamaConfig(num_hidden_layers=ARGS["layers"], hidden_size=2048, num_attention_heads=32,
                         num_key_value_heads=4, intermediate_size=5632, vocab_size=32000)
DT = {{"fp32": torch.float32, "bf16": torch.bfloat16}}[ARGS["dtype"]]
DEV = ARGS["device"]
torch.manual_seed(0)
model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).to(DT).to(DEV).eval()  # fp32 draws, cast:
# the bf16 run's weights are the fp32 run's rounded, so their greedy tokens can be compared
W = sum(p.numel() * p.element_size() for p in model.parameters())
V = int(cfg.vocab_size)
ids = torch.randint(3, V, (1, ARGS["seq"]), device=DEV)
batch = torch.randint(3, V, (ARGS["batch"], ARGS["seq"]), device=DEV)

def make(kind):
    if kind == "lrc":
        import lowrank_compiler as lrc
        return lrc.transform(model, {spec!r}, example_inputs=(ids,))
    if kind == "peft":
        import peft
        return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    return model

def step(m, opt):
    out = m(input_ids=batch, labels=batch)
    out.loss.backward()
    if opt is not None:
        opt.step(); opt.zero_grad(set_to_none=True)

def optim(kind, m):
    if kind == "hf":
        return None  # the bare model: forward + backward of the same loss, no optimizer (nothing to adapt)
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
'''

BODIES = {
    "transform": '''
m, s, peak = measure(lambda: make(KIND)) if KIND != "hf" else (model, 0.0, 0)
print(json.dumps({"s": s, "peak": peak / W, "W": W}))
''',
    "first_call": '''
m = make(KIND); m.train(); opt = optim(KIND, m)
_, s, peak = measure(lambda: step(m, opt))
print(json.dumps({"s": s, "peak": peak / W, "W": W}))
''',
    "train_step": '''
m = make(KIND); m.train(); opt = optim(KIND, m)
step(m, opt)
def steps():
    times = []
    for _ in range(ARGS["steps"]):
        t = time.perf_counter(); step(m, opt); times.append(time.perf_counter() - t)
    return times
times, s, peak = measure(steps)
print(json.dumps({"s": sorted(times)[len(times) // 2], "steps_s": times, "peak": peak / W, "W": W}))
''',
    "generate": '''
m = make(KIND); m.eval()
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.02)  # adapters that act (B = 0 would make every variant the base model)
N = ARGS["tokens"]
m.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warm-up (allocations, first-call costs)
out, s, peak = measure(lambda: m.generate(input_ids=ids, max_new_tokens=N, min_new_tokens=N, do_sample=False))
print(json.dumps({"s": s, "tok_s": N / s, "peak": peak / W, "W": W, "tokens": out[0, -N:].tolist()}))
''',
    "save": '''
m = make(KIND)
path = os.path.join(ARGS["tmp"], KIND + ("_model.lrc" if KIND == "lrc" else "_dir"))
if KIND == "lrc":
    import lowrank_compiler as lrc
    _, s, peak = measure(lambda: lrc.save(m, path))
elif KIND == "peft":  # PEFT saves the adapter only; the base is the HF checkpoint (the hf row)
    _, s, peak = measure(lambda: m.save_pretrained(path))
else:
    _, s, peak = measure(lambda: m.save_pretrained(path))
size = os.path.getsize(path) if os.path.isfile(path) else sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
print(json.dumps({"s": s, "peak": peak / W, "W": W, "file": size}))
''',
    "load": '''
del model
import gc; gc.collect()
path = os.path.join(ARGS["tmp"], KIND + ("_model.lrc" if KIND == "lrc" else "_dir"))
if KIND == "lrc":
    import lowrank_compiler as lrc
    fn = lambda: lrc.load(path)
elif KIND == "hf":
    fn = lambda: tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype=DT)
else:
    import peft
    fn = lambda: peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(
        os.path.join(ARGS["tmp"], "hf_dir"), torch_dtype=DT), path)
size = os.path.getsize(path) if os.path.isfile(path) else sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
if KIND == "peft":
    size += sum(p.stat().st_size for p in Path(ARGS["tmp"], "hf_dir").rglob("*") if p.is_file())
_, s, peak = measure(fn)
print(json.dumps({"s": s, "peak": peak / W, "over_file": peak / size, "W": W}))
''',
    "first_call_cold": '''
t = time.perf_counter()
m = make(KIND)
t_transform = time.perf_counter() - t
m.train(); opt = optim(KIND, m)
_, s, peak = measure(lambda: step(m, opt))
print(json.dumps({"s": s, "transform_s": t_transform, "peak": peak / W, "W": W}))
''',
    "export": '''
if KIND != "lrc":
    print(json.dumps({"s": None, "peak": None, "W": W})); raise SystemExit
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx
m = make(KIND)
out = os.path.join(ARGS["tmp"], "onnx", "model.onnx")  # decode graph, LoRA as ORT adapter inputs, weights external
rep, s, peak = measure(lambda: export_decoder_onnx(m, out, merge=False, external_data=True, validate=False))
print(json.dumps({"s": s, "peak": peak / W, "W": W, "external": rep.get("external_data")}))
''',
}
BODIES["first_call_warm"] = BODIES["first_call_cold"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--config", default="", help="an HF config directory or config.json (overrides --layers)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="train steps per process (the median is reported)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each phase, variant order alternating (ABBA)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_llm.json"))
    ap.add_argument("--ref-tokens", default="", help="a bench_llm JSON whose generate tokens to compare with")
    ap.add_argument("--png", default="", help="write the bar chart here (e.g. docs/bench_llm.png)")
    ap.add_argument("--from-json", nargs="+", default=[], help="run nothing: merge these results (later files "
                    "win per phase and variant), print the table and draw --png")
    a = ap.parse_args()
    if a.from_json:
        merged: dict[str, dict[str, dict]] = {}
        for f in a.from_json:
            for phase, row in json.loads(Path(f).read_text())["results"].items():
                merged.setdefault(phase, {}).update(row)
        merged = {ph: merged[ph] for ph in PHASES if ph in merged}
        print(table(merged))
        if a.png:
            plot(merged, a.png, f"{a.layers} layers, {a.dtype}")
        return
    load = open("/proc/loadavg").read().split()[:3]
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
        args = {**vars(a), "tmp": tmp}
        for phase, rnd in [(p, r) for p in a.phases for r in range(a.rounds)]:
            variants = list(a.variants) if rnd % 2 == 0 else list(reversed(a.variants))  # ABBA: no order bias
            if phase == "load":  # peft loads the hf checkpoint plus its adapter: both must exist
                _ensure_saved(args, variants, results)
            for kind in variants:  # interleaved: every phase runs each variant back to back
                t = time.time()
                body = BUILD.format(args=args, spec=SPEC) + f"KIND = {kind!r}\n" + BODIES[phase]
                try:
                    res = run_phase(body, env=_cache_env(args, phase, kind), timeout=3600)
                except RuntimeError as e:
                    res = {"error": str(e).strip().splitlines()[-1][:300]}
                prev = results.setdefault(phase, {}).get(kind)
                if prev is not None and "error" not in res and prev.get("s") is not None:  # rounds: keep every time
                    res["rounds_s"] = [*prev.get("rounds_s", [prev["s"]]), res["s"]]
                    res["s"] = sorted(res["rounds_s"])[len(res["rounds_s"]) // 2]
                results[phase][kind] = res
                print(f"{phase:11s} {kind:5s} {_fmt(res)}  ({time.time() - t:.0f} s wall)", flush=True)
    if a.ref_tokens and "generate" in results:  # greedy tokens against another run (e.g. bf16 vs fp32)
        ref = json.loads(Path(a.ref_tokens).read_text())["results"].get("generate", {})
        for kind, res in results["generate"].items():
            theirs, ours = ref.get(kind, {}).get("tokens"), res.get("tokens")
            if theirs and ours:
                same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
                res["tokens_equal_to_ref"] = same
                print(f"generate {kind}: the first {same} of {len(ours)} greedy tokens equal {a.ref_tokens}'s")
    report = {"args": vars(a), "loadavg_before": load, "loadavg_after": open("/proc/loadavg").read().split()[:3],
              "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(table(results))
    if a.png:
        plot(results, a.png, f"{a.layers if not a.config else Path(a.config).name} layers, {a.dtype}")


def _cache_env(args: dict, phase: str, kind: str) -> dict[str, str]:
    """The trace cache's environment for ``phase``: off, or a folder in the run's temp dir (empty for the cold
    phase; filled by a cold run first when the warm phase runs alone)."""
    folder = Path(args["tmp"], "trace_cache")
    env = {"LRC_CACHE_DIR": str(folder), "LRC_TRACE_CACHE": "1" if phase in CACHED else "0"}
    if phase == "first_call_cold" and kind == "lrc":
        shutil.rmtree(folder, ignore_errors=True)
    elif phase == "first_call_warm" and kind == "lrc" and not any(folder.glob("traces/*")):
        run_phase(BUILD.format(args=args, spec=SPEC) + f"KIND = {kind!r}\n" + BODIES["first_call_cold"], env=env,
                  timeout=3600)
    return env


def _ensure_saved(args: dict, variants: list[str], results: dict) -> None:
    need = ({"hf"} if "peft" in variants else set()) | set(variants)
    for kind in sorted(need):
        p = Path(args["tmp"], kind + ("_model.lrc" if kind == "lrc" else "_dir"))
        if not p.exists():
            run_phase(BUILD.format(args=args, spec=SPEC) + f"KIND = {kind!r}\n" + BODIES["save"], timeout=3600)


def _fmt(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    parts = [f"{res['s']:.2f} s" if res.get("s") is not None else "-"]
    if res.get("transform_s") is not None:
        parts.append(f"(transform {res['transform_s']:.2f} s)")
    if res.get("tok_s"):
        parts.append(f"{res['tok_s']:.2f} tok/s")
    if res.get("peak") is not None:
        parts.append(f"peak +{res['peak']:.2f} W")
    if res.get("over_file") is not None:
        parts.append(f"({res['over_file']:.2f} x file)")
    return ", ".join(parts)


def table(results: dict) -> str:
    """A markdown table: one row per phase, one column per variant."""
    kinds = sorted({k for r in results.values() for k in r}, key=VARIANTS.index)
    lines = ["| phase | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for phase, row in results.items():
        lines.append(f"| {phase} | " + " | ".join(_fmt(row[k]) if k in row else "" for k in kinds) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in VARIANTS if any(k in r for r in results.values())]
    phases = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, label in ((axes[0], "s", "seconds (generate: s per token)"), (axes[1], "peak", "peak RSS / W")):
        for i, k in enumerate(kinds):
            vals = []
            for ph in phases:
                r = results[ph].get(k, {})
                v = r.get(key)
                if key == "s" and r.get("tok_s"):
                    v = 1 / r["tok_s"]
                vals.append(v or 0.0)
            ax.bar([j + i * 0.27 for j in range(len(phases))], vals, width=0.27, label=k)
        ax.set_xticks([j + 0.27 for j in range(len(phases))], phases, rotation=30)
        ax.set_ylabel(label)
        if key == "s":
            ax.set_yscale("log")  # seconds span 0.1 (a token) to 700 (the 1.1B export)
        ax.legend()
    fig.suptitle(f"bench_llm: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
