"""`lrc` command line: help, inspect, transform, export --merge, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers.common import ATTN_SPEC, example_ids, hidden, make_hf

import lowrank_compiler as lrc
from lowrank_compiler.cli import main


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    gm = lrc.transform(make_hf("bert"), "attention.self.query:lora(r=2)", example_inputs=(example_ids(),))
    lrc.save(lrc.merge(gm), d / "base.pt")  # a plain model file with no adapters
    return d


@pytest.mark.parametrize("cmd", [[], ["inspect"], ["transform"], ["export"], ["demo"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as ei:
        main([*cmd, "--help"])
    assert ei.value.code == 0
    assert "usage: lrc" in capsys.readouterr().out


def test_inspect_table(saved_base, capsys):
    assert main(["inspect", str(saved_base / "base.pt"), "--spec", "attention.self.*:lora(r=4); !layer.1.*"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out and "32x32" in out
    assert "256" in out  # 4*32 + 32*4 added params per adapted site
    assert "no rule matches" in out


def test_transform_then_export_merge(saved_base, capsys):
    src, out, merged = saved_base / "base.pt", saved_base / "t.pt", saved_base / "merged.pt"
    assert main(["transform", str(src), "--spec", ATTN_SPEC["bert"], "-o", str(out)]) == 0
    gm = lrc.load(out)
    assert len(lrc.adapters(gm)) == 6
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_()
    lrc.save(gm, out)
    assert main(["export", "--merge", str(out), "-o", str(merged)]) == 0
    m = lrc.load(merged)
    assert not lrc.adapters(m)
    ids = example_ids(3, 9, seed=2)
    assert (hidden(m.eval()(ids)) - hidden(gm.eval()(ids))).abs().max() <= 1e-5


def test_inspect_warns_about_unused_rules(saved_base, capsys):
    assert main(["inspect", str(saved_base / "base.pt"), "--spec", "query:lora(r=2); nothing.here:lora"]) == 0
    assert "rule 2 'nothing.here:lora" in capsys.readouterr().out


def test_hf_directory_as_model(tmp_path, capsys):
    make_hf("bert").save_pretrained(tmp_path / "hf")
    assert main(["inspect", str(tmp_path / "hf"), "--spec", "query:lora(r=2)"]) == 0
    assert "encoder.layer.1.attention.self.query" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["inspect", "/nonexistent/model.pt"], "no such file"),
        (["inspect", "BASE", "--spec", "attention.*:lorra(r=2)"], "did you mean 'lora'"),
        (["transform", "BASE", "--spec", "nothing.here:lora", "-o", "OUT"], "matched no site"),
        (["export", "BASE", "-o", "OUT", "--format", "tflite"], "unknown format 'tflite'"),
    ],
)
def test_errors_exit_2_one_line(saved_base, tmp_path, capsys, argv, fragment):
    argv = [a.replace("BASE", str(saved_base / "base.pt")).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.startswith("lrc ")
    assert not (tmp_path / "o").exists()


def test_pickle_needs_trust(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "p.pt")
    assert main(["inspect", str(tmp_path / "p.pt")]) == 2
    assert "--trust" in capsys.readouterr().err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "lowrank_compiler.cli", "inspect", "/no/such"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no such file" in r.stderr
