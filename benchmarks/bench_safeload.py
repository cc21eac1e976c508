"""Cost of validated loading on real all-MiniLM-L6-v2 (LoRA r=8 on q+v), as ratios to plain torch.

Rows: ``torch.export.load`` of the embedded program (no checks: unsafe on untrusted files),
``safeload.load_exported_program`` (validate + rebuild + torch.export.load), and the whole ``lrc.load``.
Each variant is timed --rounds times in turn; the table gives medians and the ratio to the first row.

    python benchmarks/bench_safeload.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _minilm_task import load_minilm  # noqa: E402

import lowrank_compiler as lrc  # noqa: E402
from lowrank_compiler.safety import pt2 as safeload  # noqa: E402

SPEC = "attention.self.query:lora(r=8, alpha=16); attention.self.value:lora(r=8, alpha=16)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 16))
    gm = lrc.transform(load_minilm(), SPEC, example_inputs=(ids,))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.lrc"
        lrc.save(gm, path)
        program = zipfile.ZipFile(path).read("program.pt2")
        import transformers.modeling_outputs  # noqa: F401  (pytree nodes the program's out_spec names)

        variants = {
            "torch.export.load (unchecked)": lambda: torch.export.load(io.BytesIO(program)),
            "safeload.load_exported_program": lambda: safeload.load_exported_program(program, "bench"),
            "lrc.load (whole file)": lambda: lrc.load(path),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        size = path.stat().st_size / 2**20
    base = statistics.median(times["torch.export.load (unchecked)"])
    print(f"file: {size:.1f} MiB, {args.rounds} rounds, torch {torch.__version__}\n")
    print("| variant | median s | ratio |\n|---|---:|---:|")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| {k} | {m:.3f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
