"""Property tests: any mutation of a manifest, adapter file, PEFT config or shape expression either
loads correctly or raises an LrcError, never another exception."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.security import Tiny, fresh_save, members, zip_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lowrank_compiler as lrc
from lowrank_compiler import LrcError
from lowrank_compiler.safety.symexpr import ExprRefused, check_expr

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("props")
    p = fresh_save(d / "m.lrc")
    return p, members(p.read_bytes())


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


@SETTINGS
@given(data=st.data())
def test_manifest_mutations_load_or_lrc_error(saved, tmp_path_factory, data):
    path, outer = saved
    manifest = json.loads(outer["manifest.json"])
    where = data.draw(st.sampled_from(list(_paths(manifest))))
    value = data.draw(json_value)
    mutated = _set(manifest, where, value)
    p = tmp_path_factory.mktemp("m") / "x.lrc"
    p.write_bytes(zip_bytes({**outer, "manifest.json": json.dumps(mutated).encode()}))
    try:
        gm = lrc.load(p)
    except LrcError:
        return
    # it loaded: then every adapter is what a valid manifest describes
    for rec in mutated["adapters"]:
        mod = lrc.adapters(gm)[rec["site"]]
        assert isinstance(mod.merged, bool) and mod.r >= 1 and math.isfinite(mod.scaling)


@SETTINGS
@given(data=st.data())
def test_adapter_file_mutations_load_or_lrc_error(saved, tmp_path_factory, data):
    path, _ = saved
    d = tmp_path_factory.mktemp("a")
    gm = lrc.load(path)
    lrc.save_adapters(gm, d / "a.safetensors")
    raw = (d / "a.safetensors").read_bytes()
    kind = data.draw(st.sampled_from(["bytes", "tensor", "meta"]))
    if kind == "bytes":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1:]
    else:
        from safetensors import safe_open

        with safe_open(str(d / "a.safetensors"), "pt") as f:
            meta = dict(f.metadata())
        tensors = st_load(raw)
        if kind == "tensor":
            key = data.draw(st.sampled_from(sorted(tensors)))
            t = tensors[key]
            fill = data.draw(st.sampled_from([math.nan, math.inf, 1e30, 0.0]))
            dtype = data.draw(st.sampled_from([t.dtype, torch.int32, torch.float16, torch.bool]))
            shape = data.draw(st.sampled_from([tuple(t.shape), (1,), tuple(reversed(t.shape))]))
            tensors[key] = torch.full(shape, fill).to(dtype) if dtype != torch.bool else torch.ones(shape, dtype=dtype)
        else:
            records = json.loads(meta["adapters"])
            where = data.draw(st.sampled_from(list(_paths(records))))
            meta["adapters"] = json.dumps(_set(records, where, data.draw(json_value)))
        raw = st_save(tensors, metadata=meta)
    (d / "b.safetensors").write_bytes(raw)
    try:
        lrc.load_adapters(gm, d / "b.safetensors")
    except LrcError:
        return
    for p in gm.parameters():
        assert torch.isfinite(p).all()


@SETTINGS
@given(data=st.data())
def test_peft_config_mutations_load_or_lrc_error(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("p")
    torch.manual_seed(0)
    gm = lrc.transform(Tiny(), "fc*:lora(r=2, alpha=4)", example_inputs=(torch.randn(4, 6),))
    lrc.export(gm, d / "peft", format="peft")
    cfg = json.loads((d / "peft" / "adapter_config.json").read_text())
    where = data.draw(st.sampled_from(list(_paths(cfg))))
    (d / "peft" / "adapter_config.json").write_text(json.dumps(_set(cfg, where, data.draw(json_value))))
    try:
        out = lrc.load_peft(Tiny(), d / "peft", (torch.randn(4, 6),))
    except LrcError:
        return
    for mod in lrc.adapters(out).values():
        assert math.isfinite(mod.scaling) and mod.scaling > 0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="sSymbolIntegerMul()+-*/%<=>,'0123456789 _.[]:;xq=\"\\", max_size=60))
def test_expression_grammar_never_crashes(text):
    try:
        check_expr(text)
    except ExprRefused:
        return
    # accepted text has no indexing, statements, string escapes or attribute access (a '.' only in numbers)
    assert not set(text) & set('[]:;"\\'), text
    assert all(part[:1].isdigit() for part in text.split(".")[1:]), text
