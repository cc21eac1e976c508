"""Small CLI/serialization behaviours: --version, .pt2 by content, inspect of a saved model, the
non-zero probe adapter in separate ONNX validation, a quiet save/export, the demo's output folder."""

from __future__ import annotations

import zipfile

import pytest
import torch
from torch import nn

import lowrank_compiler as lrc
from lowrank_compiler.api import trainable_parameters
from lowrank_compiler.backends.onnx.export import probe_adapters
from lowrank_compiler.cli import build_parser, load_model, main
from lowrank_compiler.errors import LoadError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert lrc.__version__ in capsys.readouterr().out


def test_demo_out_dir_defaults_to_a_temp_dir_not_cwd():
    assert build_parser().parse_args(["demo"]).out_dir is None
    assert build_parser().parse_args(["demo", "--out-dir", "x"]).out_dir == "x"


@pytest.mark.parametrize("name", ["model.pt2", "weights.bin", "archive.pt2"])
def test_pt2_recognised_by_content(tmp_path, name):
    model = MLP().eval()
    ep = torch.export.export(model, (X,))
    torch.export.save(ep, tmp_path / name)  # the archive's top folder is named after the file
    gm = load_model(str(tmp_path / name))
    assert torch.allclose(gm(X), model(X))


def test_zip_that_is_not_pt2_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.pt2", "w") as z:
        z.writestr("archive/models/model.json", "{}")
        z.writestr("archive/archive_format", "not-pt2")
    with pytest.raises(LoadError, match="not an lrc model file"):
        load_model(str(tmp_path / "x.pt2"))


def test_inspect_lists_the_adapters_a_saved_model_has(tmp_path, capsys):
    gm = lrc.transform(MLP(), "fc1:lora(r=2); fc2:dora(r=2); head:full", (X,))
    lrc.save(gm, tmp_path / "m.lrc")
    assert main(["inspect", str(tmp_path / "m.lrc")]) == 0
    out = capsys.readouterr().out
    assert "already has 2 adapter(s) and 1 fully trained module(s)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "lora(r=2" in lines["fc1"] and f"{2 * (8 + 16):,}" in lines["fc1"]
    assert "dora(r=2" in lines["fc2"]
    assert "full" in lines["head"] and f"{8 * 3 + 3}" in lines["head"]
    assert f"trainable params in them: {trainable_parameters(gm)[0]:,}" in out


def test_separate_onnx_validation_uses_a_nonzero_adapter(tmp_path):
    gm = lrc.transform(MLP(), "fc1:lora(r=2); fc2:lora(r=2)", (X,))  # fresh: B = 0, the adapter is a no-op
    report = lrc.export(gm, tmp_path / "m.onnx")
    assert report["max_abs_diff"] < 1e-5
    probe = probe_adapters(gm)
    want = float((probe(X) - gm(X)).abs().max())
    assert want > 1e-3 and report["probe_effect"] == pytest.approx(want, rel=1e-5)
    for mod in lrc.adapters(gm).values():  # the model itself is untouched
        assert torch.count_nonzero(mod.lora_B) == 0


def test_save_and_export_are_quiet(tmp_path, capfd):
    gm = lrc.transform(MLP(), "fc1:lora(r=2)", (X,))
    capfd.readouterr()
    lrc.save(gm, tmp_path / "m.lrc")
    assert main(["export", str(tmp_path / "m.lrc"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", str(tmp_path / "m.lrc"), "--merge", "-o", str(tmp_path / "m.pt2")]) == 0
    out, err = capfd.readouterr()
    assert "Warning" not in err and "torchvision" not in err, err
    assert "wrote" in out


def test_quiet_keeps_lrc_warnings():
    import warnings

    from lowrank_compiler.quiet import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_third_party():
            warnings.warn("third party", FutureWarning, stacklevel=1)  # attributed to this test module
            exec(compile("import warnings; warnings.warn('ours', UserWarning)", "lrc", "exec"),
                 {"__name__": "lowrank_compiler.x"})
    assert [str(w.message) for w in seen] == ["ours"]


def test_inspect_spec_counts_full_modules_like_transform():
    from lowrank_compiler.frontend.trace import trace
    from lowrank_compiler.spec.report import inspect_table

    spec = "fc1:lora(r=2); head:full"
    traced = trace(MLP(), (X,))
    text = inspect_table(traced, spec)
    gm = lrc.transform(MLP(), spec, (X,))
    assert "trained in full by rule 2 (head:full): head, 27 params" in text
    assert f"trainable params with the fully trained modules: {trainable_parameters(gm)[0]:,}" in text
    assert "warning" not in text
