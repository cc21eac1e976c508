"""Where an adapter's per-step cost goes in ONNX Runtime decoding: lrc's loop (adapter through RunOptions, A/B fed
as numpy arrays, pre-made OrtValues, IOBinding for the base run) against onnxruntime-genai on the same genai folder.

    python benchmarks/bench_ort_adapter_feed.py [ROUNDS]

Llama hidden 512 x 4 layers (the decode benchmark's model and adapter), batch 1, prompt 16, 64 decode steps,
1 thread; each mode's CPU ms per decode step, median and minimum of ROUNDS interleaved rounds (order reversed
every other round). Prints a table; the README's decode section quotes it.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
import onnxruntime as ort  # noqa: E402
import onnxruntime_genai as og  # noqa: E402
from _decode_variants import context, genai_folder, ort_session  # noqa: E402

from lowrank_compiler.backends.onnx.adapters import read_onnx_adapter  # noqa: E402

ctx = context("llama", 512, 4, "cpu", 1, Path(tempfile.mkdtemp()))
folder = genai_folder(ctx)
ad_path = folder / "adapters" / "task.onnx_adapter"
sess = ort_session(folder / "model.onnx", "cpu", 1)
inner = sess.session
c = inner._sess
ad_tensors = {k: np.ascontiguousarray(v) for k, v in read_onnx_adapter(ad_path).items()}
print("adapter tensors", len(ad_tensors), list(ad_tensors)[:2], flush=True)
ro_plain = sess.run_options(None)
ro_ad = sess.run_options(ad_path)
ins = inner.get_inputs()
pasts = [i for i in ins if i.name.startswith("past.")]
outs = [o.name for o in inner.get_outputs()]
carry = [(k, n.replace("present.", "past.")) for k, n in enumerate(outs) if n.startswith("present.")]
N, P = 64, 16
ids0 = np.random.default_rng(0).integers(3, 2000, (1, P)).astype(np.int64)


def loop(mode):
    feeds = {i.name: np.zeros((1, int(i.shape[1]), 0, int(i.shape[3])), np.float32) for i in pasts}
    feeds["input_ids"] = ids0
    feeds["attention_mask"] = np.ones((1, P), np.int64)
    feeds["position_ids"] = np.arange(P, dtype=np.int64)[None]
    ro = ro_ad if mode == "ro_adapter" else ro_plain
    if mode == "fed_adapter":
        feeds.update(ad_tensors)
    buf = np.ones((1, P + N + 1), np.int64)
    t = None
    for s in range(N + 1):
        if s == 1:
            t = time.process_time()
        res = c.run(outs, feeds, ro)
        for k, name in carry:
            feeds[name] = res[k]
        nxt = res[0][:, -1].argmax(-1)
        feeds["input_ids"] = nxt.reshape(1, 1).astype(np.int64)
        feeds["attention_mask"] = buf[:, : P + s + 1]
        feeds["position_ids"] = np.array([[P + s]], np.int64)
    return (time.process_time() - t) / N * 1e3


def loop_iob(adapter):
    io = inner.io_binding()
    if adapter:
        for k, v in ad_tensors.items():
            io.bind_cpu_input(k, v)
    feeds = {i.name: np.zeros((1, int(i.shape[1]), 0, int(i.shape[3])), np.float32) for i in pasts}
    feeds["input_ids"] = ids0
    feeds["attention_mask"] = np.ones((1, P), np.int64)
    feeds["position_ids"] = np.arange(P, dtype=np.int64)[None]
    buf = np.ones((1, P + N + 1), np.int64)
    for o in outs:
        io.bind_output(o)
    t = None
    for s in range(N + 1):
        if s == 1:
            t = time.process_time()
        for k, v in feeds.items():
            io.bind_cpu_input(k, v)
        io.clear_binding_outputs()
        for o in outs:
            io.bind_output(o)
        inner.run_with_iobinding(io)
        res = io.get_outputs()
        for k, name in carry:
            feeds[name] = res[k]  # OrtValue: bind_ortvalue_input below
        nxt = res[0].numpy()[:, -1].argmax(-1)
        feeds = {k: v for k, v in feeds.items()}
        for k, name in carry:
            io.bind_ortvalue_input(name, res[k])
            feeds.pop(name, None)
        feeds["input_ids"] = nxt.reshape(1, 1).astype(np.int64)
        feeds["attention_mask"] = buf[:, : P + s + 1]
        feeds["position_ids"] = np.array([[P + s]], np.int64)
    return (time.process_time() - t) / N * 1e3


ad_ov = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in ad_tensors.items()}


def loop_ov(adapter):
    OV = ort.OrtValue.ortvalue_from_numpy
    feeds = {i.name: OV(np.zeros((1, int(i.shape[1]), 0, int(i.shape[3])), np.float32)) for i in pasts}
    feeds["input_ids"] = OV(ids0)
    feeds["attention_mask"] = OV(np.ones((1, P), np.int64))
    feeds["position_ids"] = OV(np.arange(P, dtype=np.int64)[None])
    if adapter:
        feeds.update(ad_ov)
    buf = np.ones((1, P + N + 1), np.int64)
    t = None
    for s in range(N + 1):
        if s == 1:
            t = time.process_time()
        res = inner.run_with_ort_values(outs, feeds, ro_plain)
        for k, name in carry:
            feeds[name] = res[k]
        nxt = res[0].numpy()[:, -1].argmax(-1)
        feeds["input_ids"] = OV(nxt.reshape(1, 1).astype(np.int64))
        feeds["attention_mask"] = OV(np.ascontiguousarray(buf[:, : P + s + 1]))
        feeds["position_ids"] = OV(np.array([[P + s]], np.int64))
    return (time.process_time() - t) / N * 1e3


cfg = og.Config(str(folder))
cfg.overlay(
    json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1, "inter_op_num_threads": 1}}}})
)
gmodel = og.Model(cfg)
ads = og.Adapters(gmodel)
ads.load(str(ad_path), "a")


def genai(adapter):
    p = og.GeneratorParams(gmodel)
    p.set_search_options(max_length=P + N + 1, min_length=P + N + 1, batch_size=1)
    g = og.Generator(gmodel, p)
    if adapter:
        g.set_active_adapter(ads, "a")
    g.append_tokens(ids0.astype(np.int32))
    g.generate_next_token()
    t = time.process_time()
    n = 0
    while not g.is_done():
        g.generate_next_token()
        n += 1
    return (time.process_time() - t) / n * 1e3


modes = {
    "base": lambda: loop("base"),
    "ro_adapter": lambda: loop("ro_adapter"),
    "fed_adapter": lambda: loop("fed_adapter"),
    "iob_base": lambda: loop_iob(False),
    "ov_base": lambda: loop_ov(False),
    "ov_adapter": lambda: loop_ov(True),
    "genai_base": lambda: genai(False),
    "genai_adapter": lambda: genai(True),
}
# sanity: iob adapter tokens effect not checked here; warm up
for f in modes.values():
    f()
R = {k: [] for k in modes}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 9):
    order = list(modes) if r % 2 == 0 else list(reversed(modes))
    for k in order:
        R[k].append(modes[k]())
print("load average", open("/proc/loadavg").read().split()[:3])
print("| mode | CPU ms/step, median | min |\n|---|---:|---:|")
for k, v in R.items():
    print(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} |")
