"""Names from a file never become code (issue 19): torch.fx pastes archive names into ``forward``.

Each attack is built from a fresh ``lrc.save``; the main one is first shown live (the unguarded
``torch.export.load(...).module()`` then a call runs the payload), then lrc must refuse it in one line
(LoadError; CLI exit 2) before torch reads the archive, with no marker file.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers.security import (
    EVIL_SEGMENT,
    Payload,
    attack_name,
    edit_program,
    fresh_save,
    members,
    name_attack_lrc,
    program_json,
    rename_everywhere,
    torch_save_bytes,
    zip_bytes,
)
from torch import fx

import lowrank_compiler as lrc
from lowrank_compiler import LoadError
from lowrank_compiler.cli import main
from lowrank_compiler.safety.names import check_graph, path_problem


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return fresh_save(tmp_path_factory.mktemp("names") / "m.lrc")


def _refused(path, marker, capsys, trust: bool = False) -> str:
    with pytest.raises(LoadError) as ei:
        lrc.load(path, trust=trust)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg, msg
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrc inspect: error: ") and err.count("\n") == 1, err
    assert not marker.exists()
    return msg


def test_parameter_name_payload_is_live_in_torch_and_refused_by_lrc(saved, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    bad = name_attack_lrc(saved, tmp_path / "name.lrc", marker)
    program = members(bad.read_bytes())["program.pt2"]
    module = torch.export.load(io.BytesIO(program)).module()
    out = module(torch.randn(4, 6))  # the payload runs and the output still has the right shape
    assert marker.exists() and out.shape == (4, 3)
    marker.unlink()
    msg = _refused(bad, marker, capsys)
    assert "not a Python identifier" in msg
    raw = tmp_path / "name.pt2"
    raw.write_bytes(program)
    _refused(raw, marker, capsys)
    _refused(raw, marker, capsys, trust=True)  # trust is about legacy pickles, never archives


def _rename_value(key: str, old: str, new: str):
    """Rename string ``old`` to ``new`` wherever it is the value of ``key`` in the program JSON."""
    def edit(inner):
        name, prog = program_json(inner)

        def walk(o):
            if isinstance(o, dict):
                for k, v in o.items():
                    if k == key and v == old:
                        o[k] = new
                    elif k == key and isinstance(v, list):
                        o[k] = [new if x == old else x for x in v]
                    else:
                        walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
        walk(prog)
        inner[name] = json.dumps(prog).encode()
    return edit


def _spec_key(which: str, old: str, new: str):
    def edit(inner):
        name, prog = program_json(inner)
        sig = prog["graph_module"]["module_call_graph"][0]["signature"]
        sig[which] = sig[which].replace(json.dumps(old), json.dumps(new))
        inner[name] = json.dumps(prog).encode()
    return edit


INJECT = 'a")\nopen({m!r}, "w")\n#'
WHERE = {
    "weights config key and signature": lambda m: attack_name(m),
    "signature parameter name only": lambda m: _rename_value("parameter_name", "fc1.weight", f"fc1.{INJECT.format(m=str(m))}"),
    "node name": lambda m: lambda inner: rename_everywhere(inner, "relu", INJECT.format(m=str(m))),
    "keyword name": lambda m: _rename_value("name", "weight", INJECT.format(m=str(m))),
    "forward argument names": lambda m: _rename_value("forward_arg_names", "x", f"x=open({str(m)!r}, 'w')"),
    "module call graph fqn": lambda m: _rename_value("fqn", "fc1", INJECT.format(m=str(m))),
    "in_spec": lambda m: _spec_key("in_spec", "null", INJECT.format(m=str(m))),
    "keyword": lambda m: lambda inner: rename_everywhere(inner, "fc2.weight", "fc2.class"),
    "dunder": lambda m: lambda inner: rename_everywhere(inner, "fc2.weight", "fc2.__class__"),
}


@pytest.mark.parametrize("where", list(WHERE))
def test_every_name_field_is_checked_before_torch_reads(saved, tmp_path, capsys, where, monkeypatch):
    marker = tmp_path / "PWNED"
    bad = edit_program(saved, tmp_path / "bad.lrc", WHERE[where](marker))
    read = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: read.append(1))
    msg = _refused(bad, marker, capsys)
    assert not read, "torch read the archive before lrc refused it"
    assert "name" in msg, msg


def test_manifest_names_are_checked(saved, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    for field, value in (("site", "fc1." + EVIL_SEGMENT.format(marker=str(marker))), ("site", "fc1.__class__")):
        outer = members(saved.read_bytes())
        manifest = json.loads(outer["manifest.json"])
        manifest["adapters"][0][field] = value
        outer["manifest.json"] = json.dumps(manifest).encode()
        bad = tmp_path / "manifest.lrc"
        bad.write_bytes(zip_bytes(outer))
        assert "adapter site" in _refused(bad, marker, capsys)
    outer = members(saved.read_bytes())
    manifest = json.loads(outer["manifest.json"])
    manifest["input_names"] = ["x=open('m')"]
    outer["manifest.json"] = json.dumps(manifest).encode()
    bad.write_bytes(zip_bytes(outer))
    assert "input name" in _refused(bad, marker, capsys)


@pytest.mark.parametrize("where", ["lrc", "pt2"])
def test_smuggled_data_pkl_is_an_archive_never_unpickled(saved, tmp_path, capsys, where):
    marker = tmp_path / "PWNED"
    outer = members(saved.read_bytes())
    if where == "lrc":
        outer["archive/data.pkl"] = torch_save_bytes(Payload(marker))
        files = outer
    else:
        files = members(outer["program.pt2"])
        files["archive/data.pkl"] = torch_save_bytes(Payload(marker))
    bad = tmp_path / f"smuggled.{where}"
    bad.write_bytes(zip_bytes(files))
    assert "trust" not in _refused(bad, marker, capsys)
    assert "trust" not in _refused(bad, marker, capsys, trust=True)
    capsys.readouterr()
    assert main(["inspect", "--trust", str(bad)]) == 2
    assert not marker.exists()


def test_name_rule():
    for ok in ("fc1", "encoder.layer.0.attention.self.query.weight", "p_fc1_weight", "_x.y9"):
        assert path_problem(ok) is None, ok
    for bad in ("", "a..b", "a.b c", 'a"b', "a.class", "a.__dict__", "a\nb", "é", "a.-1", "a.01", "x" * 2000, 3):
        assert path_problem(bad), bad
    assert path_problem("a.b", dotted=False) and path_problem("0", dotted=False)
    assert path_problem("", empty=True) is None


def test_check_graph_refuses_a_hand_built_graph():
    root = torch.nn.Module()
    root.register_buffer("w", torch.ones(2))
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.add, (x, g.get_attr("w"))))
    gm = fx.GraphModule(root, g)
    assert check_graph(gm, "hand") is gm
    node = next(n for n in gm.graph.nodes if n.op == "get_attr")
    node.target = 'w")\nimport os\n#'
    with pytest.raises(LoadError, match="hand: get_attr"):
        check_graph(gm, "hand")


def test_peft_keys_with_code_select_no_site(tmp_path):
    """PEFT tensor keys become site names only if the user's model has that site: a key carrying code
    names none, and load_peft refuses it in one line without building anything from it."""
    import safetensors.torch as st_torch
    from helpers.security import Tiny

    marker = tmp_path / "PWNED"
    torch.manual_seed(0)
    gm = lrc.transform(Tiny(), "fc*:lora(r=2, alpha=4)", example_inputs=(torch.randn(4, 6),))
    lrc.export(gm, tmp_path / "peft", format="peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    evil = EVIL_SEGMENT.format(marker=str(marker))
    tensors = {k.replace("fc2", "fc2." + evil): v for k, v in st_torch.load_file(weights).items()}
    st_torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(LoadError) as ei:
        lrc.load_peft(Tiny(), tmp_path / "peft", example_inputs=(torch.randn(4, 6),))
    assert "\n" not in str(ei.value)
    assert not marker.exists()
