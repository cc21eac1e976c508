"""`lrc export` / `lrc run`: formats, validation report, one-line errors, no partial outputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.mlp import UpDown as MLP

import lowrank_compiler as lrc
from lowrank_compiler.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = lrc.transform(MLP(), "up:lora(r=2); down:lora(r=2)", (x,))
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.5)
    lrc.save(gm, d / "task_a.pt")
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.5)
    lrc.save_adapters(gm, d / "task_b.safetensors")
    return d


def _err_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("lrc ")]


def test_export_merged_onnx_validates(saved, capsys):
    out = saved / "merged.onnx"
    assert main(["export", "--merge", str(saved / "task_a.pt"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |ORT - torch| =" in text and out.is_file()
    diff = float(text.split("max |ORT - torch| = ")[1].split()[0])
    assert diff <= 1e-5


def test_export_separate_with_adapters_dir_and_run(saved, capsys):
    out, ad = saved / "model.onnx", saved / "adapters"
    assert main(["export", str(saved / "task_a.pt"), "-o", str(out), "--adapters-dir", str(ad),
                 "--adapter", str(saved / "task_b.safetensors"), "--no-validate"]) == 0
    text = capsys.readouterr().out
    assert "max |ORT" not in text
    assert sorted(p.name for p in ad.iterdir()) == ["task_a.onnx_adapter", "task_b.onnx_adapter"]
    assert main(["run", str(out), "--adapter", str(ad / "task_a.onnx_adapter"), "--adapter",
                 str(ad / "task_b.onnx_adapter"), "--shape", "3x4"]) == 0
    text = capsys.readouterr().out
    assert "4 LoRA inputs" in text and "output: shape [3, 4, 8]" in text
    moved = [float(line.rsplit("= ", 1)[1]) for line in text.splitlines() if "max |adapter - base|" in line]
    assert len(moved) == 2 and min(moved) > 1e-3


@pytest.mark.parametrize("fmt", ["pt2", "safetensors", "peft", "pt"])
def test_other_formats(saved, fmt):
    out = saved / f"out_{fmt}" if fmt == "peft" else saved / f"out.{fmt}"
    assert main(["export", str(saved / "task_a.pt"), "-o", str(out), "--format", fmt]) == 0
    if fmt == "peft":
        assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["down", "up"]
    elif fmt in ("pt2", "pt"):
        back = lrc.load(out)
        x = torch.randn(3, 4, 8)
        with torch.no_grad():
            torch.testing.assert_close(back(x), lrc.load(saved / "task_a.pt")(x))
    else:
        assert out.stat().st_size > 0


@pytest.mark.parametrize(("args", "needle"), [
    (["--format", "tflite"], "unknown format 'tflite'; valid: onnx, pt2, safetensors, peft, pt"),
    (["--adapter", "WRONG"], "no such file"),
])
def test_export_errors_are_one_line_and_leave_nothing(saved, capsys, args, needle):
    out = saved / "bad" / "x.onnx"
    args = [a.replace("WRONG", str(saved / "nope.safetensors")) for a in args]
    assert main(["export", str(saved / "task_a.pt"), "-o", str(out), *args]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and needle in lines[0]
    assert not out.exists()


def test_export_not_a_model(saved, capsys, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    out = tmp_path / "x.onnx"
    assert main(["export", str(saved / "task_b.safetensors"), "-o", str(out)]) == 2
    assert main(["export", str(junk), "-o", str(out)]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 2 and all("not an lrc model file" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]


def test_run_rejects_adapter_that_does_not_fit(saved, capsys, tmp_path):
    import numpy as np

    from lowrank_compiler.backends.onnx.export import write_onnx_adapter

    main(["export", str(saved / "task_a.pt"), "-o", str(tmp_path / "m.onnx"), "--no-validate"])
    write_onnx_adapter({"up.lora_A.weight": np.zeros((9, 2), np.float32),
                        "up.lora_B.weight": np.zeros((2, 16), np.float32)}, tmp_path / "bad.onnx_adapter")
    capsys.readouterr()
    assert main(["run", str(tmp_path / "m.onnx"), "--adapter", str(tmp_path / "bad.onnx_adapter")]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "up.lora_A.weight: shape (9, 2) does not fit" in lines[0]


def test_peft_directory_converts_to_onnx_adapter(saved, tmp_path):
    """A PEFT directory given to --adapter becomes an .onnx_adapter equal to the model's own."""
    import numpy as np

    from lowrank_compiler.backends.onnx.export import read_onnx_adapter, session

    assert main(["export", str(saved / "task_a.pt"), "-o", str(tmp_path / "peft_a"), "--format", "peft"]) == 0
    assert main(["export", str(saved / "task_a.pt"), "-o", str(tmp_path / "m.onnx"), "--adapter-name", "own",
                 "--adapter", str(tmp_path / "peft_a")]) == 0
    own, conv = read_onnx_adapter(tmp_path / "own.onnx_adapter"), read_onnx_adapter(tmp_path / "peft_a.onnx_adapter")
    assert sorted(own) == sorted(conv) and len(own) == 4
    for k in own:
        np.testing.assert_allclose(conv[k], own[k], rtol=1e-6, atol=1e-7)
    sess = session(tmp_path / "m.onnx", "cpu")
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(sess({"x": x}, adapter=tmp_path / "peft_a.onnx_adapter")[0],
                               sess({"x": x}, adapter=tmp_path / "own.onnx_adapter")[0], atol=1e-6)
