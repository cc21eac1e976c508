"""Tracing strategies, train/eval switching, and save/load safety."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from helpers.common import ATTN_SPEC, example_ids, hidden, make_hf
from torch import nn

import lowrank_compiler as lrc
from lowrank_compiler import LoadError, SpecError, TraceError
from lowrank_compiler.formats import model as serialize
from lowrank_compiler.frontend.trace import trace


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(6, 5), nn.Linear(5, 3), nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return self.fc(x).nonzero().float()


def test_symbolic_trace_path_and_mode_switch():
    torch.manual_seed(0)
    m = Tiny()
    gm = lrc.transform(m, "fc*:lora(r=2)", example_inputs=(torch.randn(4, 6),))
    assert gm.meta["lrc"]["trace"] == "fx"
    x = torch.randn(4, 6)
    gm.eval()
    m.eval()
    assert torch.equal(gm(x), m(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropout active in train mode
    # the user's nn.Linear modules were not given adapters
    assert not any("adapter" in n for n, _ in m.named_modules())


def test_export_graph_dropout_follows_mode():
    model = make_hf("bert")
    ids = example_ids()
    gm = trace(model, (ids,))
    assert gm.meta["lrc"]["trace"] == "export"
    gm.eval()
    assert torch.equal(hidden(gm(ids)), hidden(model(ids)))
    gm.train()
    torch.manual_seed(0)
    a = hidden(gm(ids))
    assert (a - hidden(model(ids))).abs().max() > 1e-2
    sdpa = [m for n, m in gm.named_modules() if n.startswith("lrc_sdpa")]
    assert sdpa and all(abs(m.p - 0.1) < 1e-12 for m in sdpa)  # attention dropout kept from the config


def test_trace_error_names_each_strategy():
    with pytest.raises(TraceError) as ei:
        trace(Untraceable())
    msg = str(ei.value)
    assert "fx.symbolic_trace" in msg and "torch.export" in msg and "example_inputs" in msg
    with pytest.raises(TraceError):
        trace("not a model")


def test_rule_matching_no_site_lists_nearby_names():
    with pytest.raises(SpecError) as ei:
        lrc.transform(make_hf("bert"), "attention.self.qery:lora(r=2)", example_inputs=(example_ids(),))
    assert "matched no site" in str(ei.value) and "attention.self.query" in str(ei.value)


def test_r_too_large_for_site():
    with pytest.raises(SpecError) as ei:
        lrc.transform(Tiny(), "fc2:lora(r=6)")
    assert "r=6" in str(ei.value) and "fc2" in str(ei.value)


def test_excluded_and_skipped_sites():
    gm = lrc.transform(make_hf("bert"), "!layer.0.*; attention.self.query:lora(r=2); key:skip",
                       example_inputs=(example_ids(),))
    assert list(lrc.adapters(gm)) == ["encoder.layer.1.attention.self.query"]


def _saved(tmp_path):
    gm = lrc.transform(make_hf("bert"), ATTN_SPEC["bert"], example_inputs=(example_ids(),))
    path = tmp_path / "m.pt"
    lrc.save(gm, path)
    return gm, path


def test_load_errors(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        lrc.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    with pytest.raises(LoadError, match="not an lrc model"):
        lrc.load(junk)
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("a.txt", "x")
    with pytest.raises(LoadError, match="not an lrc model"):
        lrc.load(z)


def test_pickle_refused_without_trust(tmp_path):
    p = tmp_path / "legacy.pt"
    torch.save(Tiny(), p)
    with pytest.raises(LoadError, match="trust=True"):
        lrc.load(p)
    assert isinstance(lrc.load(p, trust=True), Tiny)


def test_save_is_atomic(tmp_path, monkeypatch):
    gm, path = _saved(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(serialize, "write_safetensors", boom)  # fails after the program member is written
    with pytest.raises(RuntimeError):
        lrc.save(gm, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # no temp file left


def test_adapters_swap(tmp_path):
    gm, _ = _saved(tmp_path)
    ids = example_ids()
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_()
    y1 = hidden(gm(ids)).detach()
    lrc.save_adapters(gm, tmp_path / "a1.safetensors")
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.zero_()
    lrc.load_adapters(gm, tmp_path / "a1.safetensors")
    assert torch.equal(hidden(gm(ids)), y1)
    other = lrc.transform(make_hf("bert"), "attention.self.query:lora(r=2)", example_inputs=(ids,))
    with pytest.raises(LoadError, match="differ"):
        lrc.load_adapters(other, tmp_path / "a1.safetensors")
    bad = lrc.transform(make_hf("bert"), "attention.self.*:lora(r=2)", example_inputs=(ids,))
    with pytest.raises(LoadError, match="shape"):
        lrc.load_adapters(bad, tmp_path / "a1.safetensors")
    with pytest.raises(LoadError):
        lrc.load_adapters(bad, tmp_path / "nope.safetensors")
