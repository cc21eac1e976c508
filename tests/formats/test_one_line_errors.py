"""Raw errors of issue 21 are one-line LrcErrors: optimizer on an untransformed model, export to a directory,
converting a graph with baked dtypes; a graph without them converts and runs (bf16 against the eager model)."""

from __future__ import annotations

import pytest
import torch
from helpers.decoder import batch, make_decoder
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc


def test_optimizer_on_untransformed_model():
    with pytest.raises(lrc.LrcError, match=r"^lrc.optimizer needs a transformed model, got a MLP; call gm = "):
        lrc.optimizer(make_mlp())


@pytest.mark.parametrize("name", ["m.onnx", "m.pt", "m.safetensors", "m.pt2"])
def test_export_to_a_directory(tmp_path, name):
    gm = lrc.transform(make_mlp(), "fc*:lora(r=4)", example_inputs=(inputs(),))
    (tmp_path / name).mkdir()
    with pytest.raises(lrc.errors.ExportError, match="is a directory; give a file name$"):
        lrc.export(gm, tmp_path / name)


def test_bf16_conversion_runs_or_refuses_in_one_line():
    gm = lrc.transform(make_mlp(), "fc*:lora(r=4)", example_inputs=(inputs(),))
    with torch.no_grad():
        for mod in lrc.adapters(gm).values():
            mod.lora_B.normal_(0, 0.2)
        ref = lrc.merge(gm).bfloat16()(inputs().bfloat16())  # the merged eager model, in bf16
        got = gm.to(torch.bfloat16)(inputs().bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    dec = lrc.transform(make_decoder("llama"), "self_attn.q_proj:lora(r=4)")
    with pytest.raises(lrc.LrcError, match=r"cannot convert this model to torch.bfloat16: .*lrc.transform\(model.to"):
        dec.to(torch.bfloat16)
    assert dec.dtype == torch.float32  # nothing converted
    dec.to("cpu")  # not a dtype change
    bf = lrc.transform(make_decoder("llama").to(torch.bfloat16), "self_attn.q_proj:lora(r=4)")  # the way that works
    assert bf(**batch()).logits.dtype == torch.bfloat16
