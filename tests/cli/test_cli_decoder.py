"""The CLI decoder path (issue 21): a saved causal LM exports its KV-cache decode graph and adapters,
`lrc run --generate` runs it (lrc's ORT loop and onnxruntime-genai), and every `lrc ...` command or
`--flag` an error message suggests exists in the real argparser."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.decoder import VOCAB, make_decoder

import lowrank_compiler as lrc
from lowrank_compiler.cli import build_parser, main

PKG = Path(lrc.__file__).parent


def _hint_strings() -> list[tuple[str, str]]:
    """(file, text) of every string literal in the package that mentions an `lrc ...` command or a `--flag`."""
    out = []
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and ("`lrc " in node.value
                                                                                   or "`--" in node.value):
                out.append((str(f.relative_to(PKG)), node.value))
    return out


def _flags() -> set[str]:
    ap = build_parser()
    sub = next(a for a in ap._actions if a.choices and isinstance(a.choices, dict))
    return {o for p in sub.choices.values() for a in p._actions for o in a.option_strings}


def test_every_suggested_command_parses():
    commands = [m for _, s in _hint_strings() for m in re.findall(r"`(lrc [^`]+)`", s)]
    assert any("--format genai" in c for c in commands)  # the hints this issue added are among them
    ap = build_parser()
    for cmd in commands:
        argv = shlex.split(cmd.replace("...", "X"))[1:]
        if len(argv) == 1:  # a bare subcommand name (`lrc inspect`): it must exist
            assert argv[0] in ap._subparsers._group_actions[0].choices, cmd
            continue
        try:
            ap.parse_args(argv)
        except SystemExit:
            pytest.fail(f"hint {cmd!r} does not parse with lrc's argparser")


def test_every_suggested_flag_exists():
    flags = _flags()
    for where, s in _hint_strings():
        for flag in re.findall(r"`(--[a-z][a-z-]*)", s):
            assert flag in flags, f"{where}: hint names {flag}, which no lrc command has"


def test_ort_loop_hint_names_a_real_command(tmp_path):
    from lowrank_compiler.backends.onnx.generate import ort_generate
    from lowrank_compiler.errors import ExportError

    class NoCache:
        def get_inputs(self):
            return []

    with pytest.raises(ExportError, match="`lrc export MODEL -o lm.onnx`"):
        ort_generate(NoCache(), np.zeros((1, 2), np.int64))


@pytest.mark.slow
def test_saved_causal_lm_exports_decode_graph_and_generates(tmp_path, capsys):
    model = make_decoder("qwen2")
    gm = lrc.transform(model, "self_attn.*:lora(r=4, alpha=8)")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for mod in lrc.adapters(gm).values():
            for _, p in mod.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    lrc.save(gm, tmp_path / "m.lrc")
    assert main(["export", str(tmp_path / "m.lrc"), "-o", str(tmp_path / "lm.onnx")]) == 0
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "ids.npy", ids.numpy())
    capsys.readouterr()
    assert main(["run", str(tmp_path / "lm.onnx"), "--generate", "5", "--input", f"input_ids={tmp_path / 'ids.npy'}",
                 "--adapter", str(tmp_path / "m.onnx_adapter"), "--eos", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = [[int(t) for t in line.split()] for line in lines if line.startswith("  ")]
    want_base = model.generate(ids, max_new_tokens=5, do_sample=False)[:, 6:]
    want = gm.generate(ids, max_new_tokens=5, do_sample=False)[:, 6:]
    assert got == want_base.tolist() + want.tolist()
    assert want.tolist() != want_base.tolist()
