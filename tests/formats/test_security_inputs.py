"""Issue 19 part B: every bad input from a file is a one-line LrcError (CLI exit 2), built from fresh
``lrc.save`` files and PEFT directories; declared sizes are checked against what the file holds."""

from __future__ import annotations

import io
import json
import math
import os
import zipfile

import numpy as np
import pytest
import torch
from helpers.security import Tiny, edit_manifest, encrypt_flag, fresh_save, members, one_line_cli, zip_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

import lowrank_compiler as lrc
from lowrank_compiler import LrcError
from lowrank_compiler.errors import ExportError, LoadError


def _tiny_lora(seed: int = 0):
    torch.manual_seed(seed)
    gm = lrc.transform(Tiny(), "fc*:lora(r=2, alpha=4)", example_inputs=(torch.randn(4, 6),))
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.normal_()
    return gm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    return {"lora": fresh_save(d / "lora.lrc"), "alora": fresh_save(d / "alora.lrc", "fc*:alora(r=2, r_max=4)"),
            "flora": fresh_save(d / "flora.lrc", "fc*:flora(r=2, n_adapters=2)")}


def _set_args(**kw):
    def edit(m):
        m["adapters"][0]["args"].update(kw)
    return edit


def _nested(n: int):
    v: list = []
    for _ in range(n):
        v = [v]
    return v


MANIFEST_CASES = {
    "alora_r_max": ("alora", _set_args(r_max=10**7), "r_max"),
    "flora_r": ("flora", _set_args(r=10**6), "flora: r="),
    "flora_n_adapters": ("flora", _set_args(n_adapters=10**7), "n_adapters"),
    "model_class_code": ("lora", lambda m: m.update(model_class="os.system"), "model_class"),
    "model_class_dunder": ("lora", lambda m: m.update(model_class="__class__"), "model_class"),
    "model_class_int": ("lora", lambda m: m.update(model_class=7), "model_class"),
    "hf_config_list": ("lora", lambda m: m.update(hf_config=[1, 2]), "hf_config"),
    "hf_config_no_type": ("lora", lambda m: m.update(hf_config={"vocab_size": 3}), "hf_config"),
    "hf_config_deep": ("lora", lambda m: m.update(hf_config={"model_type": "bert", "x": _nested(40)}), "hf_config"),
    "base_name_dict": ("lora", lambda m: m.update(base_model_name_or_path={"a": 1}), "base_model_name_or_path"),
    "base_name_huge": ("lora", lambda m: m.update(base_model_name_or_path="x" * 5000), "base_model_name_or_path"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_manifest_fields_are_one_line(saved, tmp_path, capsys, case):
    which, edit, needle = MANIFEST_CASES[case]
    bad = edit_manifest(saved[which], tmp_path / "bad.lrc", edit)
    with pytest.raises(LoadError, match=needle) as ei:
        lrc.load(bad)
    assert "\n" not in str(ei.value)
    assert needle in one_line_cli(["inspect", str(bad)], capsys)
    lrc.load(saved[which])  # the unedited file loads


@pytest.mark.parametrize("where", ["outer", "program"])
def test_encrypted_flag_member_is_one_line(saved, tmp_path, capsys, where):
    raw = saved["lora"].read_bytes()
    if where == "outer":
        bad = encrypt_flag(raw, "manifest.json")
        with pytest.raises(RuntimeError, match="encrypted"):  # what zipfile does when it reads the member
            zipfile.ZipFile(io.BytesIO(bad)).read("manifest.json")
    else:
        outer = members(raw)
        inner = next(n for n in members(outer["program.pt2"]) if n.endswith("models/model.json"))
        outer["program.pt2"] = encrypt_flag(outer["program.pt2"], inner)
        bad = zip_bytes(outer)
    (tmp_path / "enc.lrc").write_bytes(bad)
    with pytest.raises(LoadError, match="encrypted"):
        lrc.load(tmp_path / "enc.lrc")
    assert "encrypted" in one_line_cli(["inspect", str(tmp_path / "enc.lrc")], capsys)


def test_declared_adapters_bigger_than_the_file_are_refused_before_allocating(saved, tmp_path):
    outer = members(saved["lora"].read_bytes())
    outer["adapters.safetensors"] = st_save({})  # the manifest still declares two LoRA adapters
    bad = tmp_path / "empty.lrc"
    bad.write_bytes(zip_bytes(outer))
    with pytest.raises(LoadError, match="holds 0"):
        lrc.load(bad)


def test_alora_and_flora_specs_bounded_by_the_site():
    for spec in ("fc*:alora(r=2, r_max=10000000)", "fc*:flora(r=1000000)", "fc*:flora(n_adapters=10000000)"):
        with pytest.raises(lrc.SpecError):
            lrc.transform(Tiny(), spec, example_inputs=(torch.randn(4, 6),))


def test_float8_adapter_tensors_refused(saved, tmp_path, capsys):
    gm = lrc.load(saved["lora"])
    lrc.save_adapters(gm, tmp_path / "a.safetensors")
    t = load_file(str(tmp_path / "a.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    key = next(k for k in t if "lora_A" in k)
    t[key] = t[key].to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError):  # the unguarded check: isfinite has no float8 kernel
        torch.isfinite(t[key]).all()
    save_file(t, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(LoadError, match="float8"):
        lrc.load_adapters(gm, tmp_path / "b.safetensors")
    outer = members(saved["lora"].read_bytes())
    a = load_file(str(tmp_path / "a.safetensors"))
    a[key] = a[key].to(torch.float8_e5m2)
    outer["adapters.safetensors"] = st_save(a)
    (tmp_path / "f8.lrc").write_bytes(zip_bytes(outer))
    assert "float8" in one_line_cli(["inspect", str(tmp_path / "f8.lrc")], capsys)


@pytest.mark.parametrize("field", ["adapters", "full_modules"])
def test_deeply_nested_adapter_metadata_is_one_line(saved, tmp_path, field):
    gm = lrc.load(saved["lora"])
    lrc.save_adapters(gm, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = dict(f.metadata())
    meta[field] = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(meta[field])  # what an unguarded reader hits
    save_file(load_file(str(tmp_path / "a.safetensors")), str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(LoadError, match="nested") as ei:
        lrc.load_adapters(gm, tmp_path / "b.safetensors")
    assert "\n" not in str(ei.value)


@pytest.fixture
def peft_dir(tmp_path):
    lrc.export(_tiny_lora(), tmp_path / "peft", format="peft")
    return tmp_path / "peft"


@pytest.mark.parametrize("edit", [
    {"modules_to_save": 1}, {"modules_to_save": [1]}, {"target_modules": 5}, {"r": "8"}, {"r": 0},
    {"fan_in_fan_out": "no"}, {"inference_mode": None}, {"layers_to_transform": "0"}, {"task_type": []},
    {"base_model_name_or_path": {"a": 1}}, {"init_lora_weights": 3}, {"peft_type": 1},
])
def test_peft_config_field_types(peft_dir, edit):
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(LoadError, match=next(iter(edit))) as ei:
        lrc.load_peft(Tiny(), peft_dir, (torch.randn(4, 6),))
    assert "\n" not in str(ei.value)


def test_peft_config_nested_too_deep(peft_dir):
    (peft_dir / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LoadError, match="nested"):
        lrc.load_peft(Tiny(), peft_dir, (torch.randn(4, 6),))


def test_peft_alpha_refused_by_every_reader(peft_dir, tmp_path, capsys):
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 1e300}))
    with pytest.raises(LoadError, match="alpha"):
        lrc.load_peft(Tiny(), peft_dir, (torch.randn(4, 6),))
    base = tmp_path / "base.lrc"
    lrc.save(_tiny_lora(), base)
    out = tmp_path / "m.onnx"
    assert "alpha" in one_line_cli(["export", str(base), "-o", str(out), "--adapter", str(peft_dir),
                                    "--no-validate"], capsys)
    assert not out.exists() and not list(tmp_path.glob("*.onnx_adapter"))


def test_onnx_adapter_writer_refuses_non_finite(tmp_path):
    from lowrank_compiler.backends.onnx.adapters import write_onnx_adapter

    with pytest.raises(ExportError, match="NaN/inf"):
        write_onnx_adapter({"fc1.lora_A.weight": np.array([[np.inf]], np.float32)}, tmp_path / "x.onnx_adapter")
    assert not list(tmp_path.iterdir())


def test_peft_float8_tensor_refused(peft_dir):
    t = load_file(str(peft_dir / "adapter_model.safetensors"))
    key = next(k for k in t if "lora_B" in k)
    t[key] = t[key].to(torch.float8_e4m3fn)
    save_file(t, str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(LoadError, match="float8"):
        lrc.load_peft(Tiny(), peft_dir, (torch.randn(4, 6),))


@pytest.fixture
def named_dir(tmp_path):
    gm = _tiny_lora()
    lrc.adapter_sets.add_adapter(gm, "other", "fc*:lora(r=2, alpha=4)")
    lrc.adapter_sets.save_named_adapters(gm, tmp_path / "named")
    return tmp_path / "named"


def _write_index(d, index):
    (d / "adapters.json").write_text(index if isinstance(index, str) else json.dumps(index))


@pytest.mark.parametrize("case", ["list", "no_active", "absolute", "dotdot", "int_name", "missing_file", "not_json",
                                  "deep", "extra_key", "bad_file", "bad_records", "active_unknown"])
def test_named_adapter_dirs_have_a_schema(named_dir, tmp_path, case):
    gm = _tiny_lora(1)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((named_dir / "other.safetensors").read_bytes())
    edits = {
        "list": ["default"], "no_active": {"adapters": ["default"]},
        "absolute": {"active": "default", "adapters": ["default", str(outside.with_suffix(""))]},
        "dotdot": {"active": "default", "adapters": ["default", "../outside"]},
        "int_name": {"active": "default", "adapters": ["default", 3]},
        "missing_file": {"active": "default", "adapters": ["default", "nope"]},
        "not_json": "{'active':", "deep": "[" * 50_000 + "]" * 50_000,
        "extra_key": {"active": "default", "adapters": ["default"], "exec": "x"},
        "active_unknown": {"active": "zzz", "adapters": ["default"]},
    }
    if case in edits:
        _write_index(named_dir, edits[case])
    elif case == "bad_file":
        (named_dir / "other.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        t = load_file(str(named_dir / "other.safetensors"))
        save_file(t, str(named_dir / "other.safetensors"), metadata={"format": "lrc-adapters", "adapters": '{"a": 1}'})
    before = sorted(lrc.adapter_sets.adapter_names(gm))
    with pytest.raises(LrcError) as ei:
        lrc.adapter_sets.load_named_adapters(gm, named_dir)
    assert "\n" not in str(ei.value)
    assert sorted(lrc.adapter_sets.adapter_names(gm)) == before  # checked before the model changed


def test_named_adapter_dir_round_trip(named_dir):
    gm = _tiny_lora(1)
    lrc.adapter_sets.load_named_adapters(gm, named_dir)
    assert sorted(lrc.adapter_sets.adapter_names(gm)) == ["default", "other"]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    lrc.export(_tiny_lora(), d / "m.onnx")
    return d


@pytest.mark.parametrize("case", ["npz", "huge_header", "short", "object"])
def test_run_input_files(onnx_dir, tmp_path, capsys, case):
    f = tmp_path / "in.npy"
    if case == "npz":
        np.savez(f, x=np.zeros((3, 6), np.float32))
        os.replace(str(f) + ".npz", f)
    else:
        shape = {"huge_header": (10**9, 10**9), "short": (3, 6), "object": (3, 6)}[case]
        with open(f, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|O" if case == "object" else "<f4",
                                                      "fortran_order": False, "shape": shape})
            fh.write(b"\0" * 8)
    err = one_line_cli(["run", str(onnx_dir / "m.onnx"), "--input", f"x={f}", "--providers", "cpu"], capsys)
    assert {"npz": ".npz", "huge_header": "declares shape", "short": "declares shape", "object": "dtype"}[case] in err


def test_int8_quantize_with_nan_weight_is_one_line(tmp_path, capsys):
    gm = _tiny_lora()
    with torch.no_grad():
        next(p for n, p in gm.named_parameters() if n.endswith("weight") and "lora" not in n)[0, 0] = math.nan
    with pytest.raises(ExportError, match="NaN"):
        lrc.export(gm, tmp_path / "q.onnx", quantize="int8")
    lrc.save(gm, tmp_path / "nan.lrc")
    one_line_cli(["export", str(tmp_path / "nan.lrc"), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8"], capsys)
    assert not (tmp_path / "q.onnx").exists()


def test_writing_into_a_folder_keeps_its_symlinks(tmp_path):
    out = tmp_path / "peft"
    out.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    os.symlink(tmp_path / "notes.txt", out / "notes")
    os.symlink("does-not-exist", out / "dangling")
    (out / "sub").mkdir()
    os.symlink("../notes", out / "sub" / "rel")
    lrc.export(_tiny_lora(), out, format="peft")
    assert os.readlink(out / "notes") == str(tmp_path / "notes.txt") and (out / "notes").read_text() == "mine"
    assert os.readlink(out / "dangling") == "does-not-exist"
    assert os.readlink(out / "sub" / "rel") == "../notes"
    assert (out / "adapter_config.json").is_file()
