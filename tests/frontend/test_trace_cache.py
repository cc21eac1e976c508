"""The trace cache (issue 22): a trace is paid once per machine, holds no weights, misses on any change, and a
tampered entry is refused like a tampered lrc file (then traced again)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as tf

import lowrank_compiler as lrc
from lowrank_compiler.frontend import capture, trace_cache
from tests.helpers.decoder import VOCAB, batch, make_decoder
from tests.helpers.security import ATTACKS, Tiny, attack_name, members, zip_bytes

SPEC = "self_attn.q_proj:lora(r=4, alpha=8); self_attn.v_proj:lora(r=4, alpha=8)"
LINE = re.compile(r"lrc: tracing (\w+) \(([^)]*)\) … \d+\.\d s; cached for next time")


@pytest.fixture
def traces(monkeypatch):
    """Counts real ``torch.export`` calls; ``traces.entries()`` lists the cache folder."""
    calls = []
    real = capture._torch_export

    def counted(*a, **k):
        calls.append(type(a[0].m).__name__)
        return real(*a, **k)

    monkeypatch.setattr(capture, "_torch_export", counted)

    class T:
        count = calls

        @staticmethod
        def entries() -> list[Path]:
            return sorted(trace_cache.traces_dir().glob("*" + trace_cache.SUFFIX))

    return T


def _llama(seed: int, cls: type | None = None, **cfg) -> torch.nn.Module:
    base = make_decoder("llama")
    torch.manual_seed(seed)
    config = tf.LlamaConfig(**{**base.config.to_dict(), **cfg})
    return (cls or tf.LlamaForCausalLM)(config).eval()


def _same_as_base(gm, model) -> None:
    b = batch(seed=4)
    with torch.no_grad():
        got, want = gm(**b, labels=b["input_ids"]), model(**b, labels=b["input_ids"])
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


def _same_logits(gm, model) -> None:
    b = batch(seed=5)  # the primary signature (input_ids, attention_mask): no second trace
    with torch.no_grad():
        torch.testing.assert_close(gm(**b).logits, model(**b).logits, rtol=1e-5, atol=1e-5)


def test_second_run_reads_the_program_binds_live_weights_and_prints_nothing(traces, capsys):
    gm = lrc.transform(_llama(0), SPEC)
    _same_as_base(gm, _llama(0))
    err = capsys.readouterr().err
    lines = LINE.findall(err)
    assert lines == [("LlamaForCausalLM", "input_ids, attention_mask"), ("LlamaForCausalLM", "input_ids, attention_mask, labels")], err
    assert len(traces.count) == 2 and len(traces.entries()) == 2
    for entry in traces.entries():  # the program only: every weight payload is a one-element stub
        inner = members(members(entry.read_bytes())[trace_cache.PROGRAM])
        sizes = [len(b) for n, b in inner.items() if "/data/weights/weight_" in n]
        assert sizes and max(sizes) <= 8, sizes
    model = _llama(1)  # other weights, same config: a hit, bound to this model's tensors
    gm2 = lrc.transform(model, SPEC)
    _same_as_base(gm2, _llama(1))
    assert len(traces.count) == 2 and capsys.readouterr().err == ""
    w = model.model.layers[1].mlp.down_proj.weight
    assert any(p is w for p in gm2.parameters())  # the live tensor itself, not a copy


@pytest.mark.slow
def test_a_changed_config_class_or_torch_misses(traces, monkeypatch):
    lrc.transform(_llama(0), SPEC)
    assert len(traces.count) == 1
    model = _llama(0, rms_norm_eps=1e-2)  # same shapes, another constant in the graph
    gm = lrc.transform(model, SPEC)
    assert len(traces.count) == 2
    _same_logits(gm, model)

    class MyLlama(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = _llama(0, cls=MyLlama)
    gm = lrc.transform(model, SPEC)
    assert traces.count[-1] == "MyLlama"
    _same_logits(gm, model)
    n = len(traces.count)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    lrc.transform(_llama(0), SPEC)
    assert len(traces.count) == n + 1


class Tinier(Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_a_changed_class_attribute_or_torch_misses_fast(traces, monkeypatch):
    """The same checks as the slow Llama test on a small exported MLP (class, plain attribute, torch version)."""
    x = torch.randn(4, 6)

    def run(model):
        gm = lrc.transform(model, "fc*:lora(r=2, alpha=4)", example_inputs=(x,), strategy="export")
        torch.testing.assert_close(gm(x), model(x))

    run(Tiny())
    run(Tinier())  # same tree, other forward
    odd = Tiny()
    odd.fc2.scale_hint = 3  # a plain attribute the forward could read
    run(odd)
    real = torch.__version__
    monkeypatch.setattr(torch, "__version__", real + "+other")
    run(Tiny())
    assert len(traces.count) == 4
    monkeypatch.setattr(torch, "__version__", real)
    run(Tiny())  # and the first entry is still a hit
    assert len(traces.count) == 4


def test_off_by_env_or_argument(traces, monkeypatch):
    model = _llama(0)
    gm = lrc.transform(model, SPEC, trace_cache=False)
    _same_as_base(gm, model)  # the labels signature too: the choice is the model's
    assert len(traces.count) == 2 and traces.entries() == []
    monkeypatch.setenv("LRC_TRACE_CACHE", "0")
    lrc.transform(_llama(0), SPEC)
    assert len(traces.count) == 3 and traces.entries() == []


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "a"))
    assert trace_cache.traces_dir() == tmp_path / "a" / "traces"
    monkeypatch.delenv("LRC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert trace_cache.cache_dir() == tmp_path / "x" / "lowrank_compiler"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert trace_cache.cache_dir() == tmp_path / "h" / ".cache" / "lowrank_compiler"


# -- untrusted entries: the Tiny MLP, exported (fast) ------------------------------------------------------
def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    x = torch.randn(4, 6)
    return model, x, lrc.transform(model, "fc*:lora(r=2, alpha=4)", example_inputs=(x,), strategy="export")


def _rewrite(entry: Path, edit) -> None:
    outer = members(entry.read_bytes())
    inner = members(outer[trace_cache.PROGRAM])
    edit(inner)
    outer[trace_cache.PROGRAM] = zip_bytes(inner)
    entry.write_bytes(zip_bytes(outer))


def _refused_then_traced(traces, capsys, marker: Path) -> str:
    n = len(traces.count)
    model, x, gm = _tiny(1)
    err = capsys.readouterr().err
    assert "lrc: refused trace cache entry" in err and len(traces.count) == n + 1, err
    assert not marker.exists()
    torch.testing.assert_close(gm(x), model(x))
    return err


@pytest.mark.parametrize("attack", sorted(ATTACKS) + ["name"])
def test_tampered_entry_is_refused_and_traced_again(attack, traces, capsys, tmp_path):
    _tiny()
    (entry,) = traces.entries()
    marker = tmp_path / "pwned"
    make = ATTACKS.get(attack) or (lambda m: attack_name(m, old="m.fc2.weight"))
    _rewrite(entry, make(marker))
    capsys.readouterr()
    if attack == "sample_inputs":  # the loader never reads that member (the rebuilt archive holds it empty)
        model, x, gm = _tiny(1)
        assert not marker.exists() and len(traces.count) == 1 and capsys.readouterr().err == ""
        torch.testing.assert_close(gm(x), model(x))
        return
    _refused_then_traced(traces, capsys, marker)
    _tiny(2)  # the refused entry was replaced by the new trace
    assert len(traces.count) == 2


def test_wrong_shapes_key_or_bytes_are_refused(traces, capsys, tmp_path):
    _tiny()
    (entry,) = traces.entries()
    good = entry.read_bytes()

    def shapes(inner):  # the program claims another size for fc1.weight than the live model has
        cfg = next(n for n in inner if n.endswith("weights_config.json"))
        text = json.loads(inner[cfg])
        text["config"]["m.fc1.weight"]["tensor_meta"]["sizes"][0]["as_int"] = 7
        inner[cfg] = json.dumps(text).encode()

    _rewrite(entry, shapes)
    assert "does not fit the model" in _refused_then_traced(traces, capsys, tmp_path / "m")
    outer = members(good)
    outer[trace_cache.KEY] = outer[trace_cache.KEY].replace(b'"n_pos": 1', b'"n_pos": 0')
    entry.write_bytes(zip_bytes(outer))
    assert "its key is not this trace's" in _refused_then_traced(traces, capsys, tmp_path / "m")
    for bad in (good[: len(good) // 2], b"\x80\x04not a zip", zip_bytes({**members(good), "extra.pkl": b"x"})):
        entry.write_bytes(bad)
        _refused_then_traced(traces, capsys, tmp_path / "m")


def test_flipped_bytes_never_give_a_wrong_model(traces, capsys, tmp_path):
    _tiny()
    (entry,) = traces.entries()
    good = entry.read_bytes()
    g = torch.Generator().manual_seed(0)
    for pos in torch.randint(0, len(good), (6,), generator=g).tolist():
        bad = bytearray(good)
        bad[pos] ^= 0x5A
        entry.write_bytes(bytes(bad))
        model, x, gm = _tiny(1)
        torch.testing.assert_close(gm(x), model(x))  # refused and traced again, or read intact
    assert not (tmp_path / "m").exists()


def _tiny_rank(rank: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(*([2] * (rank - 1)), 6)
    lrc.transform(Tiny(), "fc*:lora(r=2, alpha=4)", example_inputs=(x,), strategy="export")


def test_least_recently_used_entries_go_first(traces, monkeypatch):
    _tiny_rank(2)
    _tiny_rank(3)  # each input rank is another key
    a, b = sorted(traces.entries(), key=lambda p: p.stat().st_mtime_ns)
    os.utime(a, (1, 1))
    os.utime(b, (2, 2))
    _tiny_rank(2)  # a hit: ``a`` becomes the most recently used
    assert len(traces.count) == 2 and a.stat().st_mtime > 2
    monkeypatch.setenv("LRC_TRACE_CACHE_MB", str((a.stat().st_size + b.stat().st_size) * 1.2 / (1 << 20)))
    _tiny_rank(4)
    left = traces.entries()
    assert len(traces.count) == 3 and a in left and b not in left and len(left) == 2


@pytest.mark.slow
def test_a_second_process_does_not_trace(tmp_path):
    """Two interpreters run the same script: the second reads both traces (no progress line), same outputs."""
    code = textwrap.dedent(f"""
        import torch, transformers as tf, lowrank_compiler as lrc
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=64, vocab_size={VOCAB})
        model = tf.LlamaForCausalLM(cfg).eval()
        gm = lrc.transform(model, {SPEC!r})
        ids = torch.randint(3, {VOCAB}, (2, 9))
        print(repr(gm(input_ids=ids, labels=ids).loss.item()), repr(model(input_ids=ids, labels=ids).loss.item()))
    """)
    env = {**os.environ, "LRC_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
        got, want = r.stdout.split()
        assert abs(float(got) - float(want)) < 1e-5
    assert len(LINE.findall(runs[0].stderr)) == 2 and "lrc: tracing" not in runs[1].stderr, runs[1].stderr


def test_entry_is_a_plain_zip_of_key_and_program(traces):
    _tiny()
    (entry,) = traces.entries()
    z = zipfile.ZipFile(io.BytesIO(entry.read_bytes()))
    assert sorted(z.namelist()) == [trace_cache.KEY, trace_cache.PROGRAM]
    key = json.loads(z.read(trace_cache.KEY))
    assert key["versions"]["torch"] == torch.__version__ and key["call"]["names"] == ["x"]
    assert key["model"]["class"].endswith(".Tiny")


class Branchy(torch.nn.Module):
    """Export specialises the batch size (a Python branch on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2 if x.shape[0] == 3 else self.fc(x)


def test_a_program_specialised_to_other_sizes_is_not_used(traces, capsys):
    lrc.transform(Branchy(), "fc:lora(r=2)", example_inputs=(torch.randn(3, 6),), strategy="export")
    model, x = Branchy(), torch.randn(5, 6)  # the same key (batch >= 2), but the stored program holds batch == 3
    gm = lrc.transform(model, "fc:lora(r=2)", example_inputs=(x,), strategy="export")
    assert len(traces.count) == 2 and "refused" not in capsys.readouterr().err
    torch.testing.assert_close(gm(x), model(x))
