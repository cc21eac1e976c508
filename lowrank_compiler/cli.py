"""`lrc`: inspect, transform, export, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import LrcError

EXPORT_FORMATS = ("pt",)  # extended by the ONNX/PEFT lowering ("onnx", "pt2", "safetensors", "peft")


def load_model(path: str, trust: bool = False, seq: int = 16) -> Any:
    """A GraphModule from an lrc file, a ``.pt2`` torch.export archive, or an HF model directory."""
    from . import io as lrc_io
    from .errors import LoadError

    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LoadError(f"{p} is a directory without config.json (expected a Hugging Face model directory)")
        return _load_hf_dir(p, seq)
    if not p.exists():
        raise LoadError(f"{p}: no such file or directory")
    return lrc_io.load(p, trust=trust)


def _load_hf_dir(p: Path, seq: int) -> Any:
    import torch

    from .errors import LoadError
    from .trace import trace

    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise LoadError("loading a Hugging Face directory needs `transformers` (pip install 'lowrank-compiler[hf]')") from None
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
        model = AutoModel.from_pretrained(str(p), local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{p}: could not load as a Hugging Face model offline: {e}") from None
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    ids = torch.randint(0, vocab, (2, seq))
    kwargs: dict[str, Any] = {"attention_mask": torch.ones(2, seq, dtype=torch.long)}
    if getattr(config, "use_cache", False) or "use_cache" in config.to_dict():
        kwargs["use_cache"] = False
    return trace(model, (ids,), kwargs)


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect_table

    gm = load_model(a.model, a.trust)
    print(inspect_table(gm, a.spec))
    return 0


def _cmd_transform(a: argparse.Namespace) -> int:
    from .api import print_trainable_parameters, transform
    from .io import save

    gm = load_model(a.model, a.trust)
    gm = transform(gm, a.spec)
    print_trainable_parameters(gm)
    save(gm, a.output)
    print(f"wrote {a.output}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .api import merge
    from .errors import ExportError
    from .io import save

    if a.format not in EXPORT_FORMATS:
        raise ExportError(f"unknown --format {a.format!r}; valid: {', '.join(EXPORT_FORMATS)}")
    gm = load_model(a.model, a.trust)
    if a.merge:
        gm = merge(gm)
    save(gm, a.output)
    print(f"wrote {a.output}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=a.out_dir, steps=a.steps, quick=a.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree (kept separate so extensions can add options)."""
    ap = argparse.ArgumentParser(prog="lrc", description="lowrank-compiler: low-rank adaptation as graph rewriting")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    model_help = "an lrc model file (lrc.save), a torch.export archive (.pt2), or a Hugging Face model directory"

    p = sub.add_parser("inspect", help="list linear sites, what the spec does to each, and added parameters")
    p.add_argument("model", help=model_help)
    p.add_argument("--spec", default=None, help='spec string, e.g. "attention.*:lora(r=8)"')
    p.add_argument("--trust", action="store_true", help="allow loading a legacy pickle (runs code from the file)")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("transform", help="insert adapters into a model and save it")
    p.add_argument("model", help=model_help)
    p.add_argument("--spec", required=True, help='spec string, e.g. "attention.*:lora(r=8)"')
    p.add_argument("-o", "--output", required=True, help="output lrc model file")
    p.add_argument("--trust", action="store_true", help="allow loading a legacy pickle")
    p.set_defaults(fn=_cmd_transform)

    p = sub.add_parser("export", help="write a model for deployment (merged or with separate adapters)")
    p.add_argument("model", help=model_help)
    p.add_argument("-o", "--output", required=True, help="output path")
    p.add_argument("--merge", action="store_true", help="fold adapters into the base weights")
    p.add_argument("--format", default="pt", help="output format (default: pt, an lrc model file)")
    p.add_argument("--trust", action="store_true", help="allow loading a legacy pickle")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded all-MiniLM-L6-v2")
    p.add_argument("--out-dir", default="lrc-demo", help="where the demo writes its files (default: lrc-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(fn=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except LrcError as e:
        msg = str(e).strip().splitlines()
        print(f"lrc {a.cmd}: error: {msg[0]}", file=sys.stderr)
        for line in msg[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"lrc {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
