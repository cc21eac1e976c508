"""Build malicious / corrupt variants of a fresh ``lrc.save`` file (payloads only create a marker file)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

import lowrank_compiler as lrc


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def fresh_save(path: Path, spec: str = "fc*:lora(r=2, alpha=4)") -> Path:
    torch.manual_seed(0)
    gm = lrc.transform(Tiny(), spec, example_inputs=(torch.randn(4, 6),))
    lrc.save(gm, path)
    return path


class Payload:
    """Unpickling this opens (creates) ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_save_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for n, b in files.items():
            z.writestr(n, b)
    return buf.getvalue()


def edit_program(lrc_file: Path, out: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy ``lrc_file`` to ``out`` with its embedded program.pt2 members changed by ``edit``."""
    outer = members(lrc_file.read_bytes())
    inner = members(outer["program.pt2"])
    edit(inner)
    outer["program.pt2"] = zip_bytes(inner)
    out.write_bytes(zip_bytes(outer))
    return out


def program_json(inner: dict[str, bytes]) -> tuple[str, dict]:
    name = next(n for n in inner if n.endswith("models/model.json"))
    return name, json.loads(inner[name])


def attack_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """Route 1: a pickled sample-inputs member that needs weights_only=False."""
    def edit(inner: dict[str, bytes]) -> None:
        name = next(n for n in inner if "sample_inputs" in n)
        inner[name] = torch_save_bytes(Payload(marker))
    return edit


def attack_use_pickle(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """Route 2: a weight marked use_pickle whose payload is a pickle."""
    def edit(inner: dict[str, bytes]) -> None:
        cfg_name = next(n for n in inner if n.endswith("weights_config.json"))
        cfg = json.loads(inner[cfg_name])
        fqn, entry = next(iter(cfg["config"].items()))
        entry["use_pickle"] = True
        inner[cfg_name] = json.dumps(cfg).encode()
        inner[next(n for n in inner if n.endswith("/" + entry["path_name"]))] = torch_save_bytes(Payload(marker))
    return edit


def attack_sympy(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """Route 3: a symbolic shape expression that is Python code (sympify evaluates it)."""
    def edit(inner: dict[str, bytes]) -> None:
        name, prog = program_json(inner)
        text = json.dumps(prog)
        sym = next(iter(prog["range_constraints"]))
        old = f"Symbol('{sym}', positive=True, integer=True)"
        assert old in text, "the fresh program has no symbolic expression to replace"
        new = f"open('{marker}', 'w') and Symbol('{sym}', positive=True, integer=True)"
        inner[name] = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1], 1).encode()
    return edit


ATTACKS = {"sample_inputs": attack_sample_inputs, "use_pickle": attack_use_pickle, "sympy": attack_sympy}


#: a parameter name that fx pastes into ``forward`` as ``getattr(self.fc2, "<name>")``: the quote closes the
#: string, the payload runs on every call, and the call still returns the real weight
EVIL_SEGMENT = ('x") if open({marker!r}, "w") and 0 else getattr(getattr(self, "fc2"), "_parameters")'
                '[max(getattr(getattr(self, "fc2"), "_parameters"))]#')


def rename_everywhere(inner: dict[str, bytes], old: str, new: str) -> None:
    """Rename ``old`` to ``new`` in every JSON member of a torch.export archive (keys and values)."""
    for n, b in list(inner.items()):
        if n.endswith(".json"):
            inner[n] = b.decode().replace(json.dumps(old), json.dumps(new)).encode()


def attack_name(marker: Path, old: str = "fc2.weight") -> Callable[[dict[str, bytes]], None]:
    """Route 4 (issue 19): a parameter name holding Python source, pasted into generated code by torch.fx."""
    def edit(inner: dict[str, bytes]) -> None:
        rename_everywhere(inner, old, old.rsplit(".", 1)[0] + "." + EVIL_SEGMENT.format(marker=str(marker)))
    return edit



def name_attack_lrc(lrc_file: Path, out: Path, marker: Path) -> Path:
    """A whole lrc file whose ``fc2`` weight name holds the payload (its adapter record dropped, so the
    manifest still fits the renamed graph)."""
    edit_program(lrc_file, out, attack_name(marker))
    outer = members(out.read_bytes())
    manifest = json.loads(outer["manifest.json"])
    manifest["adapters"] = [r for r in manifest["adapters"] if r["site"] != "fc2"]
    outer["manifest.json"] = json.dumps(manifest).encode()
    kept = {k: v for k, v in safetensors.torch.load(outer["adapters.safetensors"]).items() if ".fc2" not in k
            and not k.startswith("fc2")}
    outer["adapters.safetensors"] = safetensors.torch.save(kept)
    out.write_bytes(zip_bytes(outer))
    return out


def one_line_cli(argv: list[str], capsys) -> str:
    """Run ``lrc argv``; assert exit 2 with exactly one stderr line (no traceback); return that line."""
    from lowrank_compiler.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(f"lrc {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in captured.out + err
    return err


def edit_manifest(lrc_file: Path, out: Path, edit: Callable[[dict], None]) -> Path:
    """Copy ``lrc_file`` to ``out`` with its manifest.json changed by ``edit`` (in place on the parsed dict)."""
    outer = members(lrc_file.read_bytes())
    manifest = json.loads(outer["manifest.json"])
    edit(manifest)
    outer["manifest.json"] = json.dumps(manifest).encode()
    out.write_bytes(zip_bytes(outer))
    return out


PEAK_RSS_CODE = """
import resource, sys, json
import torch, transformers, transformers.models.bert.modeling_bert  # imported before the baseline
import lowrank_compiler as lrc
from lowrank_compiler.cli import load_model
gm = load_model(sys.argv[1]) if len(sys.argv) > 2 else None  # exporting: the measured step is the write
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if gm is None:
        load_model(sys.argv[1])
    else:
        lrc.export(gm, sys.argv[3], format=sys.argv[2])
    outcome = "done"
except lrc.LrcError as e:
    outcome = "refused: " + str(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_kib": after - before}))
"""


def peak_rss_growth(path: Path, *export: str) -> tuple[str, int]:
    """(outcome, growth of the peak RSS in bytes) of ``lrc`` loading ``path`` (then ``export = (format,
    out)``: writing it) in a fresh interpreter."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PEAK_RSS_CODE, str(path), *export], capture_output=True, text=True,
                       cwd=os.getcwd(), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return got["outcome"], got["grew_kib"] * 1024


def encrypt_flag(data: bytes, member: str) -> bytes:
    """``data`` (a zip) with the encrypted bit set on ``member`` in its local and central headers."""
    import struct

    b = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    b[info.header_offset + 6] |= 1
    cd = data.find(b"PK\x01\x02")
    while cd != -1:
        n = struct.unpack("<H", data[cd + 28:cd + 30])[0]
        if data[cd + 46:cd + 46 + n].decode() == member:
            b[cd + 8] |= 1
        cd = data.find(b"PK\x01\x02", cd + 4)
    return bytes(b)


def raw_onnx_adapter(tensors: dict, path: Path) -> None:
    """Write an ``.onnx_adapter`` with ONNX Runtime directly (no lrc checks): how a hostile file is made."""
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    fmt.export_adapter(str(path))
