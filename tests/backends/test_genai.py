"""onnxruntime-genai folders (`lrc.export(gm, dir, format="genai")`): the folder loads in onnxruntime-genai as
it is, and its greedy tokens equal torch's ``generate`` for the unmodified base and for each adapter set
(LoRA-GA in its rank-2r form, LoRA, VeRA, AdaLoRA with a pruned rank, DoRA with its gain) switched per
generator; lrc's own
ORT loop samples the tokens HF's seeded ``generate`` samples."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from helpers.decoder import VOCAB, make_decoder

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.backends.onnx.genai import GenaiRunner
from lowrank_compiler.backends.onnx.generate import ort_generate
from lowrank_compiler.cli import main

og = pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow  # one decoder export (~20 s idle, ~60 s on a loaded 2-core host)

SITES = "self_attn.q_proj|self_attn.v_proj|mlp.down_proj"
SETS = {"lora": "lora(r=4, alpha=8)", "vera": "vera(r=4)", "adalora": "adalora(init_r=4, target_r=2, alpha=8, total_step=100)",
        "dora": "dora(r=4, alpha=8)"}
NEW = 6


def _perturb(mods, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in mods:
            for _, p in mod.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = make_decoder("llama")
    base = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(3, VOCAB, (2, 2, 8), generator=g)]
    spec = "; ".join(f"{s}:loraga(r=2, alpha=4)" for s in SITES.split("|"))
    gm = lrc.transform(model, spec, data=data, loss_fn=lambda out, b: out.loss, progress=False)
    assert not gm.training
    _perturb(lrc.adapters(gm).values(), 1)
    for i, (name, method) in enumerate(SETS.items()):
        lrc.adapter_sets.add_adapter(gm, name, "; ".join(f"{s}:{method}" for s in SITES.split("|")))
        lrc.adapter_sets.set_adapter(gm, name)
        _perturb(lrc.adapters(gm).values(), 10 + i)
        if name == "adalora":  # prune a rank: only the kept ones may reach the file
            for mod in lrc.adapters(gm).values():
                with torch.no_grad():
                    mod.lora_E[1] = 0
    lrc.adapter_sets.set_adapter(gm, "default")
    out = tmp_path_factory.mktemp("genai") / "llama"
    report = lrc.export(gm, out, format="genai", adapter_name="loraga")
    return gm, base, out, report


def _prompt() -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))


def test_folder_layout_and_config_names_the_graph(folder):
    gm, base, out, report = folder
    assert report["max_abs_diff"] < 1e-4
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(f"{n}.onnx_adapter" for n in
                                                                        ["loraga", *SETS])
    assert (out / "model.onnx.data").is_file()  # external data
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = {i.name: i for i in proto.graph.input}
    key0 = [d.dim_value for d in names["past.0.key"].type.tensor_type.shape.dim]
    assert (dec["num_key_value_heads"], dec["head_size"]) == (key0[1], key0[3]) == (2, 8)
    assert dec["num_hidden_layers"] == base.config.num_hidden_layers
    assert set(dec["inputs"].values()) - {"past.%d.key", "past.%d.value"} <= set(names)
    assert cfg["model"]["eos_token_id"] == base.config.eos_token_id


def test_loraga_file_is_rank_2r(folder):
    _, _, out, _ = folder
    from lowrank_compiler.backends.onnx.adapters import read_onnx_adapter

    t = read_onnx_adapter(out / "adapters" / "loraga.onnx_adapter")
    assert t["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (32, 4)  # r = 2 → 2r
    kept = read_onnx_adapter(out / "adapters" / "adalora.onnx_adapter")
    # 4 ranks, one pruned, + the rank-2 offset the LoRA-GA set left in the shared base (torch runs on it)
    assert kept["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (32, 3 + 2)


def _until_eos(seq: list[int], eos: int = 2) -> list[int]:
    """Tokens before the first EOS (onnxruntime-genai's sequence may stop without it; HF's includes it)."""
    return seq[:seq.index(eos)] if eos in seq else seq


def test_greedy_tokens_equal_torch_per_adapter(folder):
    gm, base, out, _ = folder
    ids = _prompt()
    runner = GenaiRunner(out)
    want = base.generate(ids, max_new_tokens=NEW, do_sample=False)[0].tolist()
    assert _until_eos(runner.generate(ids.numpy(), NEW)[0]) == _until_eos(want)  # no adapter: the unmodified model (LoRA-GA offset undone)
    seen = {tuple(want)}
    for name, label in [("default", "loraga"), *((n, n) for n in SETS)]:
        lrc.adapter_sets.set_adapter(gm, name)
        want = gm.generate(ids, max_new_tokens=NEW, do_sample=False)[0].tolist()
        assert _until_eos(runner.generate(ids.numpy(), NEW, label)[0]) == _until_eos(want), name
        seen.add(tuple(want))
    lrc.adapter_sets.set_adapter(gm, "default")
    assert len(seen) >= 5  # the adapters change the tokens, so the comparison can fail


def test_genai_seeded_sampling_is_reproducible(folder):
    _, _, out, _ = folder
    runner = GenaiRunner(out)
    ids = _prompt().numpy()
    a = runner.generate(ids, 8, "lora", do_sample=True, top_k=20, seed=3)
    assert a == runner.generate(ids, 8, "lora", do_sample=True, top_k=20, seed=3)
    assert a != runner.generate(ids, 8, "lora", do_sample=True, top_k=20, seed=4)


@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, top_k=10), dict(top_p=0.8, top_k=0)])
def test_ort_loop_sampling_equals_hf_generate(folder, opts):
    gm, _, out, _ = folder
    sess = session(out / "model.onnx", providers="cpu")
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    adapter = out / "adapters" / "loraga.onnx_adapter"
    gm.generate(ids, max_new_tokens=2, do_sample=False)  # trace the decode variants first
    torch.manual_seed(7)
    want = gm.generate(ids, max_new_tokens=NEW, do_sample=True, **opts).numpy()
    got = ort_generate(sess, ids, max_new_tokens=NEW, adapter=adapter, do_sample=True, seed=7, **opts)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, ort_generate(sess, ids, max_new_tokens=NEW, adapter=adapter))


def test_ort_loop_cli_runs_the_dora_set(folder, tmp_path, capsys):
    """`lrc run FOLDER --generate N --engine ort --adapter dora`: lrc's own ORT loop feeds the DoRA gain too."""
    gm, _, out, _ = folder
    ids = _prompt()
    np.save(tmp_path / "ids.npy", ids.numpy())
    lrc.adapter_sets.set_adapter(gm, "dora")
    want = gm.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:].tolist()
    lrc.adapter_sets.set_adapter(gm, "default")
    assert main(["run", str(out), "--generate", str(NEW), "--engine", "ort", "--eos", "2", "--adapter", "dora",
                 "--input", f"input_ids={tmp_path / 'ids.npy'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "dora.onnx_adapter: generated" in lines[2]
    assert [int(t) for t in lines[3].split()] == want


def test_top_k_1_sampling_is_greedy_in_genai(folder):
    _, _, out, _ = folder
    runner = GenaiRunner(out)
    ids = _prompt().numpy()
    assert runner.generate(ids, NEW, "dora", do_sample=True, top_k=1, seed=9) == runner.generate(ids, NEW, "dora")


def test_dora_fa_as_the_model_adapter_next_to_a_lora_set(tmp_path):
    """DoRA-FA as the transformed model's own set (its gain file), a LoRA named set in the same folder."""
    model = make_decoder("llama")
    base = copy.deepcopy(model)
    gm = lrc.transform(model, "; ".join(f"{s}:dora_fa(r=4, alpha=8)" for s in SITES.split("|")))
    _perturb(lrc.adapters(gm).values(), 21)
    lrc.adapter_sets.add_adapter(gm, "lora", "; ".join(f"{s}:lora(r=2, alpha=4)" for s in SITES.split("|")))
    lrc.adapter_sets.set_adapter(gm, "lora")
    _perturb(lrc.adapters(gm).values(), 22)
    lrc.adapter_sets.set_adapter(gm, "default")
    report = lrc.export(gm, tmp_path / "g", format="genai", adapter_name="dorafa")
    assert report["max_abs_diff"] < 1e-4
    runner, ids = GenaiRunner(tmp_path / "g"), _prompt()
    seen = set()
    for name, label in [(None, None), ("default", "dorafa"), ("lora", "lora")]:
        model = base if name is None else gm
        if name is not None:
            lrc.adapter_sets.set_adapter(gm, name)
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0].tolist()
        assert _until_eos(runner.generate(ids.numpy(), NEW, label)[0]) == _until_eos(want), name
        seen.add(tuple(want))
    assert len(seen) == 3
