"""Writes lose nothing: refused targets, kept modes, stale temp cleanup, output-path faults as one-line
errors, and PEFT directories that concurrent writers never mix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers.security import Tiny, fresh_save
from safetensors.torch import load_file

import lowrank_compiler as lrc
from lowrank_compiler import LrcError
from lowrank_compiler.cli import main
from lowrank_compiler.safety.atomic import STALE_SECONDS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = fresh_save(tmp_path_factory.mktemp("w") / "m.lrc")
    gm = lrc.load(p)
    base = p.with_name("base.lrc")  # adapters merged away: a plain model to transform on the CLI
    lrc.save(lrc.merge(gm), base)
    return base, gm


def _no_temps(d) -> bool:
    return not [p for p in os.listdir(d) if p.endswith(".tmp")]


def test_refuses_fifo_symlink_directory(model, tmp_path):
    _, gm = model
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LrcError, match="not a regular file"):
        lrc.save(gm, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    target = tmp_path / "target.lrc"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.lrc"
    link.symlink_to(target)
    with pytest.raises(LrcError, match="symbolic link"):
        lrc.save(gm, link)
    assert link.is_symlink() and target.read_bytes() == b"keep me"
    with pytest.raises(LrcError, match="is a directory"):
        lrc.save(gm, tmp_path)
    assert _no_temps(tmp_path)


def test_overwrite_keeps_mode(model, tmp_path):
    _, gm = model
    out = tmp_path / "m.lrc"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    lrc.save(gm, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert isinstance(lrc.load(out), torch.fx.GraphModule)
    new = tmp_path / "new.lrc"
    lrc.save(gm, new)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask


def test_stale_temps_from_a_killed_save_are_removed(model, tmp_path):
    _, gm = model
    out = tmp_path / "m.lrc"
    old, young = tmp_path / ".m.lrc.dead1.tmp", tmp_path / ".m.lrc.live2.tmp"
    old.write_bytes(b"partial")
    young.write_bytes(b"another writer, still running")
    t = time.time() - STALE_SECONDS - 10
    os.utime(old, (t, t))
    lrc.save(gm, out)
    assert not old.exists() and young.exists()
    # a killed save for real: SIGKILL while writing leaves a temp; the next save removes it once stale
    code = ("import sys, os, signal; sys.path.insert(0, 'tests'); import lowrank_compiler as lrc;"
            "from lowrank_compiler.safety import atomic as s;"
            f"gm = lrc.load({str(model[0])!r});"
            "s.atomic_write(sys.argv[1], lambda f: (f.write(b'x' * 1000), f.flush(), os.kill(os.getpid(), 9)))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "k.lrc")], capture_output=True)
    assert r.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".k.lrc.")]
    assert len(left) == 1
    os.utime(left[0], (t, t))
    lrc.save(gm, tmp_path / "k.lrc")
    assert not left[0].exists() and isinstance(lrc.load(tmp_path / "k.lrc"), torch.fx.GraphModule)


@pytest.mark.parametrize("fault", ["parent_is_file", "name_too_long", "empty", "is_dir", "read_only"])
def test_output_path_faults_are_one_line(model, tmp_path, capsys, monkeypatch, fault):
    path, gm = model
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = {"parent_is_file": blocker / "m.lrc", "name_too_long": tmp_path / ("n" * 300 + ".lrc"), "empty": "",
           "is_dir": tmp_path, "read_only": tmp_path / "ro" / "m.lrc"}[fault]
    if fault == "read_only":
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        if os.geteuid() == 0:  # root ignores permission bits: make the OS say what it would say
            import tempfile

            def denied(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(LrcError) as ei:
        lrc.save(gm, out)
    assert "\n" not in str(ei.value)
    capsys.readouterr()
    assert main(["transform", str(path), "--spec", "fc1:lora(r=1)", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrc transform: error: ") and err.count("\n") == 1, err
    assert _no_temps(tmp_path)


def test_file_size_limit_is_one_line_and_leaves_nothing(model, tmp_path):
    path, _ = model
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000));"
            "from lowrank_compiler.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "big.lrc"
    r = subprocess.run([sys.executable, "-c", code, "transform", str(path), "--spec", "fc1:lora(r=1)", "-o", str(out)],
                       capture_output=True, text=True, cwd=os.getcwd())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "File too large" in r.stderr, r.stderr
    assert not out.exists() and _no_temps(tmp_path)


def test_peft_directory_writers_never_mix(tmp_path):
    models = []
    for k in (1, 2):
        torch.manual_seed(k)
        gm = lrc.transform(Tiny(), f"fc*:lora(r=2, alpha={4 * k})", example_inputs=(torch.randn(4, 6),))
        for mod in lrc.adapters(gm).values():
            torch.nn.init.constant_(mod.lora_B, float(k))
        models.append(gm)
    (tmp_path / "keep").mkdir()
    for trial in range(8):
        out = tmp_path / f"peft{trial}"
        out.mkdir()
        (out / "README.md").write_text("mine")
        errors = []

        def write(gm, out=out, errors=errors, n=3):
            try:
                for _ in range(n):
                    lrc.export(gm, out, format="peft")
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=write, args=(m,)) for m in models]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        alpha = json.loads((out / "adapter_config.json").read_text())["lora_alpha"]
        b = next(v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k)
        assert float(b.flatten()[0]) == alpha / 4  # config and weights from the same writer
        assert (out / "README.md").read_text() == "mine"
        assert _no_temps(tmp_path)
