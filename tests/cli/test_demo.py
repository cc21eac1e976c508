"""`lrc demo` end to end (quick mode) on the real MiniLM, in-process and through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_compiler as lrc
from lowrank_compiler.demo.data import LABELS, TEST_PER_LABEL, split
from lowrank_compiler.demo.run import QUICK_STEPS, run_demo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_demo_data_is_balanced_and_disjoint():
    train, test = split()
    assert len(test) == TEST_PER_LABEL * len(LABELS)
    assert {y for _, y in test} == set(range(len(LABELS)))
    assert not {s for s, _ in train} & {s for s, _ in test}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    result = run_demo(out_dir=str(out), quick=True)
    assert torch.get_num_threads() == threads  # the demo's 1-thread setting is restored
    return out, result


def test_quick_demo_numbers(quick):
    out, r = quick
    assert r["steps"] == QUICK_STEPS
    # zero-initialized head: every logit ties, argmax is class 0, i.e. exactly the class-0 share
    assert r["acc_before"] == pytest.approx(1 / len(LABELS))
    assert 0.0 <= r["acc_after"] <= 1.0 and r["final_loss"] == r["final_loss"]  # not NaN
    assert r["n_adapters"] == 12  # query + value in 6 layers
    assert 0 < r["trainable_params"] < 0.01 * r["total_params"]
    assert r["diff_merged_vs_unmerged"] <= 1e-5
    assert r["diff_reloaded_vs_memory"] <= 1e-5
    assert r["diff_reloaded_merged_vs_memory"] <= 1e-5
    for f in r["files"].values():
        assert Path(f).is_file() and Path(f).parent == out


def test_quick_demo_files_reload_independently(quick, minilm):
    """The saved adapter model and the saved adapters agree with the merged file."""
    _, r = quick
    _, tok = minilm
    enc = tok(["rain is coming tonight", "the striker scored"], padding="max_length", max_length=12,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    adapted = lrc.load(r["files"]["adapted"]).eval()
    merged = lrc.load(r["files"]["merged"]).eval()
    assert len(lrc.adapters(adapted)) == 12 and not lrc.adapters(merged)
    with torch.no_grad():
        ref = merged(ids, mask)
        torch.testing.assert_close(adapted(ids, mask), ref, atol=1e-5, rtol=0)
        lrc.load_adapters(adapted, r["files"]["adapters"])  # same tensors again: output unchanged
        torch.testing.assert_close(adapted(ids, mask), ref, atol=1e-5, rtol=0)


def test_cli_demo_quick_exits_0(tmp_path):
    out = tmp_path / "cli-demo"
    proc = subprocess.run([sys.executable, "-m", "lowrank_compiler.cli", "demo", "--quick", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lrc demo summary" in proc.stdout
    assert (out / "minilm-lora.lrc").is_file()
