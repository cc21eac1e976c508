"""Issue 19 part B: Hugging Face directories (safetensors only, no remote code, no silent random weights)
and memory bounded by the file: refusing a small file that declares a huge model allocates little."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.security import Payload, edit_manifest, fresh_save, peak_rss_growth, torch_save_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

import lowrank_compiler as lrc
from lowrank_compiler import cli
from lowrank_compiler.errors import LoadError

tf = pytest.importorskip("transformers")

# Peak-RSS growth allowed while refusing a file: a small multiple of its size plus a fixed slack for the
# interpreter (lazily imported modules, allocator arenas). The attacks below would need gigabytes.
SLACK, MULTIPLE = 96 << 20, 10


def _bound(path) -> int:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return MULTIPLE * size + SLACK


def bert_cfg(**kw):
    return tf.BertConfig(**{"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 16,
                            "intermediate_size": 32, "vocab_size": 50, "max_position_embeddings": 32, **kw})


@pytest.fixture
def bert_dir(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "bert"
    tf.BertModel(bert_cfg()).eval().save_pretrained(str(d))
    return d


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    code = "import sys; from lowrank_compiler.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=os.getcwd(),
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.parametrize("case", ["bin_pickle", "auto_map"])
def test_code_carrying_hf_dirs_are_one_line_in_a_fresh_process(bert_dir, tmp_path, case):
    marker = tmp_path / "PWNED"
    if case == "bin_pickle":
        (bert_dir / "model.safetensors").unlink()
        state = {"payload": Payload(marker)}
        (bert_dir / "pytorch_model.bin").write_bytes(torch_save_bytes(state))
    else:
        cfg = json.loads((bert_dir / "config.json").read_text())
        cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
        (bert_dir / "config.json").write_text(json.dumps(cfg))
        (bert_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    r = _cli(["inspect", str(bert_dir)])
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lrc inspect: error: "), r.stderr
    assert ("pickle" if case == "bin_pickle" else "auto_map") in r.stderr
    assert not marker.exists()


def test_missing_weights_are_named_not_random(bert_dir):
    t = load_file(str(bert_dir / "model.safetensors"))
    dropped = sorted(k for k in t if "encoder.layer.0.output" in k)
    save_file({k: v for k, v in t.items() if k not in dropped}, str(bert_dir / "model.safetensors"),
              metadata={"format": "pt"})
    # unguarded: transformers loads the directory and initializes the missing weights at random
    model, info = tf.BertModel.from_pretrained(str(bert_dir), output_loading_info=True)
    assert info["missing_keys"] and isinstance(model, tf.BertModel)
    with pytest.raises(LoadError, match="missing") as ei:
        cli.load_model(str(bert_dir))
    assert "\n" not in str(ei.value) and "encoder.layer.0.output" in str(ei.value)


def test_renamed_weights_are_missing_and_unexpected(bert_dir):
    t = load_file(str(bert_dir / "model.safetensors"))
    save_file({f"x{k}": v for k, v in t.items()}, str(bert_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match="unexpected") as ei:
        cli.load_model(str(bert_dir))
    assert "missing" in str(ei.value) and "\n" not in str(ei.value)


def test_no_weights_file_is_one_line(bert_dir):
    (bert_dir / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no model.safetensors"):
        cli.load_model(str(bert_dir))


def test_intact_dir_still_loads(bert_dir):
    gm = cli.load_model(str(bert_dir))
    ref = tf.BertModel.from_pretrained(str(bert_dir)).eval()
    ids = torch.randint(0, 50, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        assert (gm(ids, mask).last_hidden_state - ref(input_ids=ids, attention_mask=mask).last_hidden_state
                ).abs().max() < 1e-5


@pytest.mark.slow
def test_small_hf_dir_declaring_a_huge_model_allocates_little(tmp_path):
    d = tmp_path / "huge"
    d.mkdir()
    bert_cfg(vocab_size=20_000_000).save_pretrained(str(d))  # a 2.5 GB embedding table, declared in 1 KB
    (d / "model.safetensors").write_bytes(st_save({"embeddings.word_embeddings.weight": torch.zeros(2, 16)}))
    outcome, grew = peak_rss_growth(d)
    assert outcome.startswith("refused") and "missing" in outcome, outcome
    print(f"peak RSS growth refusing {d.name}: {grew / 2**20:.1f} MiB (bound {_bound(d) / 2**20:.1f} MiB)")
    assert grew < _bound(d), (grew, _bound(d))


@pytest.mark.slow
@pytest.mark.parametrize("spec,args", [("fc*:alora(r=2, r_max=4)", {"r_max": 10**7}),
                                       ("fc*:flora(r=2, n_adapters=2)", {"n_adapters": 10**7})])
def test_small_lrc_file_declaring_huge_adapters_allocates_little(tmp_path, spec, args):
    good = fresh_save(tmp_path / "good.lrc", spec)
    bad = edit_manifest(good, tmp_path / "bad.lrc", lambda m: m["adapters"][0]["args"].update(args))
    outcome, grew = peak_rss_growth(bad)
    assert outcome.startswith("refused"), outcome
    print(f"peak RSS growth refusing {args}: {grew / 2**20:.1f} MiB (bound {_bound(bad) / 2**20:.1f} MiB)")
    assert grew < _bound(bad), (grew, _bound(bad))
    with pytest.raises(LoadError):
        lrc.load(bad)


@pytest.mark.slow
def test_hf_layout_export_of_a_huge_recorded_config_allocates_little(bert_dir, tmp_path):
    gm = lrc.transform(cli.load_model(str(bert_dir)), "attention.self.query:lora(r=2)")
    lrc.save(gm, tmp_path / "m.lrc")
    bad = edit_manifest(tmp_path / "m.lrc", tmp_path / "bad.lrc",
                        lambda m: m["hf_config"].update(vocab_size=20_000_000))  # 1.3 GB of embeddings
    outcome, grew = peak_rss_growth(bad, "hf", str(tmp_path / "out"))
    print(f"peak RSS growth refusing --format hf: {grew / 2**20:.1f} MiB (bound {_bound(bad) / 2**20:.1f} MiB)")
    assert outcome.startswith("refused") and "word_embeddings" in outcome, outcome
    assert grew < _bound(bad) and not (tmp_path / "out").exists()
