"""A decoder ONNX export is staged beside its target and moved in when complete: a failure leaves the folder as it
was (an earlier export's files included), a success leaves the graph, its data file and nothing else."""

from __future__ import annotations

import onnx
import pytest

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx
from lowrank_compiler.errors import ExportError
from tests.helpers.decoder import SPECS, make_decoder

pytestmark = pytest.mark.slow  # a decoder export each: 10-25 s on 2 cores


@pytest.fixture(scope="module")
def gm():
    return lrc.transform(make_decoder("llama"), SPECS["llama"][0])


@pytest.mark.parametrize("external", [False, True])
def test_failed_export_leaves_the_folder_as_it_was(gm, tmp_path, monkeypatch, external):
    target = tmp_path / "lm.onnx"
    target.write_bytes(b"an earlier export")
    (tmp_path / "lm.onnx.data").write_bytes(b"its weights")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*a, **k):
        raise ExportError("disk full (simulated)")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(ExportError, match="simulated"):
        export_decoder_onnx(gm, target, merge=False, external_data=external, validate=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp folder, nothing replaced


def test_export_with_external_data_leaves_graph_data_and_adapter(gm, tmp_path):
    report = export_decoder_onnx(gm, tmp_path / "lm.onnx", merge=False, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.onnx_adapter", "lm.onnx", "lm.onnx.data"]
    assert report["max_abs_diff"] < 1e-4  # the moved files still find each other: ORT ran them against torch


def test_exports_share_the_base_and_leave_the_model_as_it_was(tmp_path):
    """Merged, separate and genai exports of a model whose init moved its base (PiSSA) work on copies that share
    the frozen weights (ir.frozen_shared_copy): every tensor of the model is the same object, bitwise, afterwards."""
    import torch

    gm = lrc.transform(make_decoder("llama"), "self_attn.*:lora(r=4, alpha=8, init=\"pissa\")")
    export_decoder_onnx(gm, tmp_path / "warm.onnx", merge=False)  # traces the decode signature (lifts its constants)
    before = {n: (t, t.detach().clone()) for n, t in [*gm.named_parameters(), *gm.named_buffers()]}
    export_decoder_onnx(gm, tmp_path / "merged.onnx", merge=True)
    export_decoder_onnx(gm, tmp_path / "separate.onnx", merge=False)
    lrc.export(gm, tmp_path / "genai", format="genai")
    after = dict([*gm.named_parameters(), *gm.named_buffers()])
    assert after.keys() == before.keys()
    assert all(after[n] is t and torch.equal(t, old) for n, (t, old) in before.items())
