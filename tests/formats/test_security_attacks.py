"""Untrusted files never run code: the four routes of issue 10, each built from a fresh lrc.save.

Each attack is first shown to be live (plain ``torch.export.load`` runs the payload, creating the
marker), then ``lrc.load`` and ``lrc inspect`` must refuse it with LoadError / exit 2 and one line,
without creating the marker.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers.security import ATTACKS, Payload, edit_program, fresh_save, members, torch_save_bytes, zip_bytes

import lowrank_compiler as lrc
from lowrank_compiler import LoadError
from lowrank_compiler.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return fresh_save(tmp_path_factory.mktemp("sec") / "m.lrc")


def _live(program: bytes, marker) -> bool:
    """Whether torch.export.load itself runs the payload (the attack is real, not a strawman)."""
    try:
        torch.export.load(io.BytesIO(program))
    except Exception:  # noqa: BLE001, S110
        pass
    hit = marker.exists()
    if hit:
        marker.unlink()
    return hit


def _assert_refused_cli(path, capsys) -> str:
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrc inspect: error: ") and err.count("\n") == 1, err
    return err


REFUSED = [r for r in ATTACKS if r != "sample_inputs"]


def test_pickled_sample_inputs_are_never_read(saved, tmp_path, capsys):
    """The sample-inputs pickle is not scanned but dropped: the rebuilt archive holds it empty, so the
    payload never runs and the model loads (lrc keeps example inputs in safetensors)."""
    marker = tmp_path / "PWNED"
    bad = edit_program(saved, tmp_path / "sample.lrc", ATTACKS["sample_inputs"](marker))
    assert _live(members(bad.read_bytes())["program.pt2"], marker)
    for trust in (False, True):
        gm = lrc.load(bad, trust=trust)
        x = torch.randn(4, 6)
        torch.testing.assert_close(gm(x), lrc.load(saved)(x))
    capsys.readouterr()
    assert main(["inspect", str(bad)]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("route", REFUSED)
def test_attack_in_lrc_file_is_refused(saved, tmp_path, capsys, route):
    marker = tmp_path / "PWNED"
    bad = edit_program(saved, tmp_path / f"{route}.lrc", ATTACKS[route](marker))
    assert _live(members(bad.read_bytes())["program.pt2"], marker)
    with pytest.raises(LoadError) as ei:
        lrc.load(bad)
    assert str(bad) in str(ei.value)
    assert not marker.exists()
    _assert_refused_cli(bad, capsys)
    assert not marker.exists()
    with pytest.raises(LoadError):  # trust=True is about legacy pickles, never about archives
        lrc.load(bad, trust=True)
    assert not marker.exists()


@pytest.mark.parametrize("route", REFUSED)
def test_attack_as_raw_pt2_is_refused(saved, tmp_path, capsys, route):
    """Route 4: the same payloads in a raw .pt2 given as MODEL."""
    marker = tmp_path / "PWNED"
    bad = edit_program(saved, tmp_path / "x.lrc", ATTACKS[route](marker))
    pt2 = tmp_path / f"{route}.pt2"
    pt2.write_bytes(members(bad.read_bytes())["program.pt2"])
    assert _live(pt2.read_bytes(), marker)
    with pytest.raises(LoadError):
        lrc.load(pt2)
    _assert_refused_cli(pt2, capsys)
    assert not marker.exists()


def test_clean_raw_pt2_loads_and_matches(saved, tmp_path):
    pt2 = tmp_path / "clean.pt2"
    pt2.write_bytes(members(saved.read_bytes())["program.pt2"])
    gm, base = lrc.load(pt2), lrc.load(saved)
    x = torch.randn(3, 6)
    lrc.unmerge(base)
    # the raw program is the base graph: equal to the lrc model with its adapters bypassed
    for m in lrc.adapters(base).values():
        m.bypass = True
    torch.testing.assert_close(gm(x), base(x))


@pytest.mark.parametrize("what", ["operator_target", "custom_obj", "legacy_weights", "extra_member", "aoti"])
def test_other_code_routes_refused(saved, tmp_path, what):
    marker = tmp_path / "PWNED"

    def edit(inner):
        name = next(n for n in inner if n.endswith("models/model.json"))
        prog = json.loads(inner[name])
        root = name.split("/")[0]
        if what == "operator_target":  # torch.os.system reachable by getattr from torch
            prog["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
        elif what == "custom_obj":
            prog["graph_module"]["graph"]["custom_obj_values"] = {"obj": {"name": "x", "class_fqn": "y"}}
        elif what == "legacy_weights":
            inner[f"{root}/data/weights/model.pt"] = torch_save_bytes(Payload(marker))
        elif what == "extra_member":
            inner[f"{root}/extra/evil.py"] = b"import os"
        else:
            inner[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF"
        inner[name] = json.dumps(prog).encode()

    bad = edit_program(saved, tmp_path / f"{what}.lrc", edit)
    with pytest.raises(LoadError):
        lrc.load(bad)
    assert not marker.exists()


def test_legacy_pickle_needs_trust_and_trust_on_non_model_is_one_line(tmp_path, capsys):
    p = tmp_path / "model.pt"
    p.write_bytes(torch_save_bytes({"not": "a model"}))
    with pytest.raises(LoadError, match="trust=True"):
        lrc.load(p)
    with pytest.raises(LoadError, match="not a model"):
        lrc.load(p, trust=True)
    assert main(["inspect", str(p), "--trust"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dict, not a model" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04junk that is not a pickle")
    with pytest.raises(LoadError, match="could not be loaded"):
        lrc.load(junk, trust=True)


def test_compressed_member_zip_bomb_refused_without_inflating(saved, tmp_path):
    """A ~200 KB file whose program member inflates to 200 MB: refused from the directory alone."""
    outer = members(saved.read_bytes())
    outer["program.pt2"] = b"\0" * (200 << 20)
    bomb = tmp_path / "bomb.lrc"
    import zipfile

    bomb.write_bytes(zip_bytes(outer, zipfile.ZIP_DEFLATED))
    assert bomb.stat().st_size < 2 << 20
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(LoadError, match="compressed"):
        lrc.load(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20  # nothing near the inflated size was allocated


def test_encrypted_member_flag_is_one_line(saved, tmp_path, capsys):
    """A member whose general-purpose flag says 'encrypted' made zipfile raise RuntimeError (issue 19)."""
    data = bytearray(saved.read_bytes())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # local header flag at +6, central directory flag at +8
        i = data.find(sig)
        while i >= 0:
            data[i + (6 if sig == b"PK\x03\x04" else 8)] |= 1
            i = data.find(sig, i + 4)
    bad = tmp_path / "encrypted.lrc"
    bad.write_bytes(bytes(data))
    with pytest.raises(LoadError):
        lrc.load(bad)
    _assert_refused_cli(bad, capsys)


def test_nested_zip_sample_inputs_never_read(saved, tmp_path):
    """The sample-inputs member is dropped unread, so a deeply nested zip there cannot recurse (issue 19)."""
    blob = b"x"
    for _ in range(300):
        blob = zip_bytes({"archive/data.pkl": blob})

    def edit(inner):
        inner[next(n for n in inner if "sample_inputs" in n)] = blob
    bad = edit_program(saved, tmp_path / "nested.lrc", edit)
    x = torch.randn(4, 6)
    torch.testing.assert_close(lrc.load(bad)(x), lrc.load(saved)(x))
