"""Adapter formats from elsewhere (PEFT directories, .onnx_adapter, `lrc run` inputs, site regexes):
bad content is a one-line LrcError, never code, a crash or a silently wrong model."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from helpers.security import Tiny, raw_onnx_adapter, torch_save_bytes
from safetensors.torch import load_file, save_file

import lowrank_compiler as lrc
from lowrank_compiler import LrcError, SpecError
from lowrank_compiler.backends.onnx.adapters import read_onnx_adapter
from lowrank_compiler.cli import main


def _tiny_lora(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(4, 6)
    gm = lrc.transform(Tiny(), "fc*:lora(r=2, alpha=4)", example_inputs=(x,))
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.normal_()
    return gm, x


def _one_line_cli(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lrc {argv[0]}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def peft_dir(tmp_path):
    gm, _ = _tiny_lora()
    lrc.export(gm, tmp_path / "peft", format="peft")
    return tmp_path / "peft"


def test_peft_pickle_weights_refused(peft_dir, tmp_path):
    (peft_dir / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    from helpers.security import Payload

    (peft_dir / "adapter_model.bin").write_bytes(torch_save_bytes(Payload(marker)))
    with pytest.raises(LrcError, match="pickle"):
        lrc.load_peft(Tiny(), peft_dir, (torch.randn(4, 6),))
    assert not marker.exists()


@pytest.mark.parametrize("edit", [
    {"lora_alpha": math.nan}, {"lora_alpha": -2}, {"lora_alpha": "8"}, {"use_rslora": "yes"},
    {"lora_dropout": 1.5}, {"alpha_pattern": {"(.*.*)*x": 2.0}}, {"alpha_pattern": {"fc1": math.inf}},
    {"rank_pattern": []}, "not an object",
])
def test_bad_peft_config_is_one_line(peft_dir, capsys, edit):
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**cfg, **edit} if isinstance(edit, dict) else edit))
    with pytest.raises(LrcError) as ei:
        lrc.load_peft(Tiny(), peft_dir, (torch.randn(4, 6),))
    assert "\n" not in str(ei.value) and "adapter_config.json" in str(ei.value)


@pytest.mark.parametrize("bad", ["rank_mismatch", "nan", "int", "3d"])
def test_bad_peft_tensors_refused_at_load_and_onnx_export(peft_dir, tmp_path, capsys, bad):
    path = peft_dir / "adapter_model.safetensors"
    t = load_file(str(path))
    a_key = next(k for k in t if "fc1.lora_A" in k)
    b_key = a_key.replace("lora_A", "lora_B")
    if bad == "rank_mismatch":
        t[b_key] = torch.randn(t[b_key].shape[0], 3)
    elif bad == "nan":
        t[a_key] = torch.full_like(t[a_key], math.nan)
    elif bad == "int":
        t[a_key] = t[a_key].to(torch.int32)
    else:
        t[a_key] = t[a_key][None]
    save_file(t, str(path))
    with pytest.raises(LrcError) as ei:
        lrc.load_peft(Tiny(), peft_dir, (torch.randn(4, 6),))
    assert "fc1" in str(ei.value)
    # exporting an ONNX model with this PEFT directory as an extra adapter: refused before ORT sees it
    base = tmp_path / "base.lrc"
    lrc.save(_tiny_lora()[0], base)
    out = tmp_path / "m.onnx"
    _one_line_cli(["export", str(base), "-o", str(out), "--adapter", str(peft_dir), "--no-validate"], capsys)
    assert not out.exists() and not (tmp_path / "peft.onnx_adapter").exists()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    gm, _ = _tiny_lora()
    lrc.export(gm, d / "m.onnx")
    return d


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_bad_onnx_adapter_tensors(onnx_model, tmp_path, capsys, bad):
    good = read_onnx_adapter(onnx_model / "m.onnx_adapter")
    k = next(iter(good))
    good[k] = np.full_like(good[k], np.nan) if bad == "nan" else good[k].astype(np.int32)
    raw_onnx_adapter(good, tmp_path / "bad.onnx_adapter")  # lrc's own writer refuses NaN
    with pytest.raises(LrcError, match="finite" if bad == "nan" else "dtype"):
        read_onnx_adapter(tmp_path / "bad.onnx_adapter")
    _one_line_cli(["run", str(onnx_model / "m.onnx"), "--adapter", str(tmp_path / "bad.onnx_adapter"),
                   "--providers", "cpu"], capsys)


def test_corrupt_onnx_adapter_bytes_fuzz(onnx_model, tmp_path):
    raw = (onnx_model / "m.onnx_adapter").read_bytes()
    rng = random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(150):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if i % 5 == 0:
            b = b[: rng.randrange(len(b))]
        p = tmp_path / "f.onnx_adapter"
        p.write_bytes(bytes(b))
        try:
            out = read_onnx_adapter(p)
            assert all(np.isfinite(v).all() for v in out.values())
            outcomes["ok"] += 1
        except LrcError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 30


@pytest.mark.parametrize("case", ["name", "dtype", "shape", "not_npy"])
def test_run_inputs_checked(onnx_model, tmp_path, capsys, case):
    arr = {"name": np.zeros((3, 6), np.float32), "dtype": np.zeros((3, 6), np.int64),
           "shape": np.zeros((3, 6, 1), np.float32), "not_npy": None}[case]
    f = tmp_path / "in.npy"
    if arr is None:
        f.write_bytes(b"\x93NUMPY garbage")
    else:
        np.save(f, arr)
    name = "nope" if case == "name" else "x"
    err = _one_line_cli(["run", str(onnx_model / "m.onnx"), "--input", f"{name}={f}", "--providers", "cpu"], capsys)
    assert {"name": "no input 'nope'", "dtype": "dtype int64", "shape": "shape [3, 6, 1]",
            "not_npy": "not a .npy"}[case] in err


@pytest.mark.parametrize("pattern", [r"(.*.*)*x", r"(a+)+$", r"(a|a)*b", r"(?:a?){30}a{30}", r"(\w)\1"])
def test_catastrophic_site_regex_is_refused(pattern):
    with pytest.raises(SpecError, match="refused"):
        lrc.transform(Tiny(), f"re:{pattern}:lora(r=2)", example_inputs=(torch.randn(4, 6),))


def test_ordinary_site_regexes_still_work():
    for spec in (r"re:fc[0-9]+:lora(r=2)", r"re:.*f.*c.*:lora(r=2)", r"re:(fc)(1|2):lora(r=2)"):
        gm = lrc.transform(Tiny(), spec, example_inputs=(torch.randn(4, 6),))
        assert sorted(lrc.adapters(gm)) == ["fc1", "fc2"]
