"""Structured fuzzing of every JSON field an lrc file carries (issue 19).

Each example either rewrites 1-3 fields (a string, a number, or a dict key: names included) of the
program JSON, the weights/constants configs or the manifest of a fresh ``lrc.save`` with hostile values,
or renames one name consistently in every document (so the archive stays coherent and torch builds it)
to a name carrying a payload that runs wherever fx pastes it; then it loads the file and calls the model. Required: no marker file (payloads would create it), no exception
but :class:`LrcError` from loading, and no hang (a SIGALRM per example fails the test; no timing
asserts). ``LRC_FUZZ_EXAMPLES=N`` runs a longer campaign.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers.security import fresh_save, members, zip_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrank_compiler as lrc
from lowrank_compiler.errors import LrcError

EXAMPLES = int(os.environ.get("LRC_FUZZ_EXAMPLES", "30"))
HANG_S = 120


def _fields(obj, path=()):
    """Every (path, kind) of a JSON document: kind 'key' for dict keys, 'value' for str/number leaves."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,), "key"
            yield from _fields(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _fields(v, path + (i,))
    elif isinstance(obj, (str, int, float)) and not isinstance(obj, bool):
        yield path, "value"


def _set(doc, path, kind, new):
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if kind == "key":
        parent[new if isinstance(new, str) else str(new)] = parent.pop(last)
    else:
        parent[last] = new


def _hostile(marker: str) -> st.SearchStrategy:
    code = [f'x")\nopen({marker!r}, "w")\n#', f"x') or open({marker!r}, 'w') or ('", f"__import__('os').system('touch {marker}')",
            f"open({marker!r}, 'w') and Symbol('s0')", f"a\"]\nopen({marker!r},'w')#", f"x=open({marker!r}, 'w')"]
    strings = st.sampled_from(code + ["", " ", "a" * 5000, "fc2.__class__", "fc2.class", "../../x", "9**9**9",
                                      "Pow(2, Mul(64,64,64,64,64))", "-" * 3000 + "1", "é", "\x00", "s0",
                                      "torch.ops.aten.linear.default", "builtins.eval", "null", "[]", "{}",
                                      "re:" + ".?" * 32 + "Z", "fc1", "0", "1e308"]) | st.text(max_size=30)
    numbers = st.sampled_from([0, -1, 1, 2, 7, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 1e308, -1e308, 0.5, 1e-320])
    return strings | numbers | st.sampled_from([None, True, [], {}, [1] * 3])


def _payload_name(old: str, marker: str) -> st.SearchStrategy:
    """Names that run the payload when pasted as ``getattr(x, "<leaf>")``, a parameter or a dict key."""
    head = old.rsplit(".", 1)[0] + "." if "." in old else ""
    return st.sampled_from([head + f'x") if open({marker!r}, "w") else getattr(self, "x',
                            f"{old}=open({marker!r}, 'w')", f"{old}':open({marker!r}, 'w'),'",
                            f"{old}\nopen({marker!r}, 'w')\n"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    saved = fresh_save(d / "m.lrc")
    outer = members(saved.read_bytes())
    inner = members(outer["program.pt2"])
    docs = {("outer", "manifest.json"): json.loads(outer["manifest.json"])}
    docs.update({("inner", n): json.loads(b) for n, b in inner.items() if n.endswith(".json")})
    fields = [(doc, path, kind) for doc, tree in docs.items() for path, kind in _fields(tree)]
    names = sorted({path[-1] for _, path, kind in fields if kind == "key" and isinstance(path[-1], str)}
                   | {_get(docs[doc], path) for doc, path, kind in fields if kind == "value"
                      and isinstance(_get(docs[doc], path), str) and _get(docs[doc], path).replace(".", "_")
                      .replace("_", "a").isalnum()})
    return d, outer, inner, docs, fields, names


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _alarm(signum, frame):
    raise TimeoutError(f"an example ran longer than {HANG_S} s (a hang)")


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 30,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_every_field_load_and_call(base, data):
    d, outer, inner, docs, fields, names = base
    marker = d / "PWNED"
    new_docs = json.loads(json.dumps({f"{a}|{b}": v for (a, b), v in docs.items()}))
    if data.draw(st.booleans()):
        old = data.draw(st.sampled_from(names))
        edits = [("rename", old, data.draw(_payload_name(old, str(marker))))]
        text = json.dumps(new_docs).replace(json.dumps(json.dumps(old))[1:-1], json.dumps(json.dumps(edits[0][2]))[1:-1])
        new_docs = json.loads(text.replace(json.dumps(old), json.dumps(edits[0][2])))
    else:
        edits = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True))
        for (where, name), path, kind in edits:
            try:
                _set(new_docs[f"{where}|{name}"], path, kind, data.draw(_hostile(str(marker))))
            except (KeyError, IndexError, TypeError):
                pass  # an earlier edit in this example moved the field
    new_inner = {**inner, **{n: json.dumps(new_docs[f"inner|{n}"]).encode() for n in inner if f"inner|{n}" in new_docs}}
    new_outer = {**outer, "program.pt2": zip_bytes(new_inner),
                 "manifest.json": json.dumps(new_docs["outer|manifest.json"]).encode()}
    f = Path(d) / "fuzzed.lrc"
    f.write_bytes(zip_bytes(new_outer))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        try:
            gm = lrc.load(f)
        except LrcError as e:
            assert "\n" not in str(e), str(e)
            return
        try:
            gm(torch.randn(4, 6))
        except LrcError:
            pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        assert not marker.exists(), f"payload ran: {edits}"


@pytest.mark.parametrize("edit", ["signature_none", "fqn_int"])
def test_fuzzer_findings_are_one_line(base, edit):
    """Found by the long run: a validated program torch cannot unlift raised AttributeError/AssertionError."""
    d, outer, inner, docs, _, _ = base
    name = next(n for n in inner if n.endswith("models/model.json"))
    prog = json.loads(json.dumps(docs[("inner", name)]))
    entry = prog["graph_module"]["module_call_graph"][0]
    if edit == "signature_none":
        entry["signature"] = None
    else:
        entry["fqn"] = 0
    f = Path(d) / f"{edit}.lrc"
    f.write_bytes(zip_bytes({**outer, "program.pt2": zip_bytes({**inner, name: json.dumps(prog).encode()})}))
    with pytest.raises(LrcError) as ei:
        lrc.load(f)
    assert "\n" not in str(ei.value)
