"""A corpus of corrupt files built from one fresh save: each one is an LrcError in Python and exit 2
with one line on the CLI (never a traceback), and loading the untouched file still works."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.security import fresh_save, members, zip_bytes
from safetensors.torch import save as st_save

import lowrank_compiler as lrc
from lowrank_compiler import LrcError
from lowrank_compiler.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return fresh_save(d / "m.lrc")


def _manifest_variants(m: dict) -> dict[str, object]:
    rec = m["adapters"][0]
    out: dict[str, object] = {
        "not_object": [1, 2], "format": {**m, "format": "other"}, "version_str": {**m, "version": "1"},
        "version_new": {**m, "version": 99}, "version_bool": {**m, "version": True},
        "names_missing": {k: v for k, v in m.items() if k != "input_names"},
        "names_int": {**m, "input_names": [3]}, "adapters_dict": {**m, "adapters": {}},
        "sdpa_bad": {**m, "sdpa_dropout": [1.5]}, "const_list": {**m, "const_kwargs": [1]},
        "specs_int": {**m, "specs": [1]},
    }
    bad_records = {
        "r0": {**rec, "args": {**rec["args"], "r": 0}}, "r_float": {**rec, "args": {**rec["args"], "r": 2.5}},
        "alpha_neg": {**rec, "args": {**rec["args"], "alpha": -1.0}},
        "alpha_huge": {**rec, "args": {**rec["args"], "alpha": 1e308}},
        "merged_str": {**rec, "merged": "no"}, "rslora_str": {**rec, "args": {**rec["args"], "rslora": "yes"}},
        "method_unknown": {**rec, "method": "lorax"}, "method_int": {**rec, "method": 3},
        "site_missing": {k: v for k, v in rec.items() if k != "site"}, "site_unknown": {**rec, "site": "nope"},
        "args_list": {**rec, "args": {"r": [2]}}, "arg_unknown": {**rec, "args": {**rec["args"], "x": 1}},
        "extra_field": {**rec, "evil": 1}, "record_str": "lora",
        "r_too_big": {**rec, "args": {**rec["args"], "r": 64}},
    }
    for k, r in bad_records.items():
        out[f"record_{k}"] = {**m, "adapters": [r, *m["adapters"][1:]]}
    out["record_dup"] = {**m, "adapters": [rec, *m["adapters"]]}
    return out


def corpus(path) -> dict[str, bytes]:
    data = path.read_bytes()
    outer = members(data)
    cases: dict[str, bytes] = {}
    for frac in (0.0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999):
        cases[f"truncate_{frac}"] = data[: int(len(data) * frac)]
    cases["truncate_minus1"] = data[:-1]
    cases["truncate_minus30"] = data[:-30]
    # flip bytes inside each member's data (CRC-covered) and in the zip structures
    import io
    import zipfile

    z = zipfile.ZipFile(io.BytesIO(data))
    for info in z.infolist():
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        for k, off in enumerate((start, start + info.file_size // 2, start + info.file_size - 1)):
            b = bytearray(data)
            b[off] ^= 0xFF
            cases[f"flip_{info.filename}_{k}"] = bytes(b)
    for off in (0, 2, 10, len(data) - 22, len(data) - 12, len(data) - 6):
        b = bytearray(data)
        b[off] ^= 0xFF
        cases[f"flip_struct_{off}"] = bytes(b)
    for name in outer:
        cases[f"drop_{name}"] = zip_bytes({k: v for k, v in outer.items() if k != name})
        cases[f"rename_{name}"] = zip_bytes({(k + ".x" if k == name else k): v for k, v in outer.items()})
        cases[f"garbage_{name}"] = zip_bytes({**outer, name: b"\x00garbage" * 3})
        cases[f"empty_{name}"] = zip_bytes({**outer, name: b""})
    manifest = json.loads(outer["manifest.json"])
    cases["manifest_bad_json"] = zip_bytes({**outer, "manifest.json": b"{not json"})
    cases["manifest_nan"] = zip_bytes({**outer, "manifest.json": json.dumps(
        {**manifest, "adapters": [{**manifest["adapters"][0], "args": {**manifest["adapters"][0]["args"],
                                                                        "alpha": math.nan}}]}).encode()})
    cases["manifest_deep"] = zip_bytes({**outer, "manifest.json": b"[" * 100000 + b"]" * 100000})
    cases["manifest_latin1"] = zip_bytes({**outer, "manifest.json": b"\xff\xfe{}"})
    for k, v in _manifest_variants(manifest).items():
        cases[f"manifest_{k}"] = zip_bytes({**outer, "manifest.json": json.dumps(v).encode()})
    ad = st_load(outer["adapters.safetensors"])
    key = next(iter(ad))
    for k, t in {"nan": torch.full_like(ad[key], math.nan), "inf": torch.full_like(ad[key], math.inf),
                 "int": ad[key].to(torch.int32), "shape": ad[key].t().contiguous().clone()}.items():
        cases[f"adapter_{k}"] = zip_bytes({**outer, "adapters.safetensors": st_save({**ad, key: t})})
    cases["adapter_missing_key"] = zip_bytes({**outer, "adapters.safetensors": st_save(
        {k: v for k, v in ad.items() if k != key})})
    cases["inputs_missing"] = zip_bytes({**outer, "inputs.safetensors": st_save({"other": torch.zeros(1)})})
    inner = members(outer["program.pt2"])
    for name in inner:
        short = name.split("/", 1)[1]
        cases[f"program_drop_{short}"] = zip_bytes({**outer, "program.pt2": zip_bytes(
            {k: v for k, v in inner.items() if k != name})})
        if name.endswith(".json"):
            cases[f"program_badjson_{short}"] = zip_bytes({**outer, "program.pt2": zip_bytes(
                {**inner, name: b"{]"})})
        if "/weights/weight_" in name:
            cases[f"program_short_{short}"] = zip_bytes({**outer, "program.pt2": zip_bytes(
                {**inner, name: inner[name][:-4]})})
    cases["not_zip"] = b"hello, this is text"
    cases["empty_file"] = b""
    return cases


def st_load(b: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(b)


def test_corpus_every_case_is_one_line_lrc_error(base, tmp_path, capsys):
    assert isinstance(lrc.load(base), torch.fx.GraphModule)
    cases = corpus(base)
    assert len(cases) > 100
    loaded, refused = [], []
    for name, data in cases.items():
        p = tmp_path / (name.replace("/", "_") + ".lrc")
        p.write_bytes(data)
        try:
            lrc.load(p)
            loaded.append(name)
        except LrcError as e:
            assert "\n" not in str(e), (name, str(e))
            refused.append(name)
        capsys.readouterr()
        rc = main(["inspect", str(p)])
        err = capsys.readouterr().err
        assert rc == (0 if name in loaded else 2), (name, err)
        if rc == 2:
            assert err.startswith("lrc inspect: error: ") and err.count("\n") == 1, (name, err)
    # the only survivors are flips that no checksum covers (zip directory padding); none is a content change
    # survivors: flips in zip timestamps/padding that no checksum covers, and dropping a program member
    # lrc never reads; none changes what is loaded
    optional = ("sample_inputs", "byteorder", "serialization_id")  # members lrc never reads
    assert all(n.startswith("flip_struct") or any(o in n for o in optional) for n in loaded), loaded
    assert len(refused) >= len(cases) - 6
