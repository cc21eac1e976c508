"""`lrc`: inspect, transform, export, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lowrank_compiler.errors import LrcError

EXPORT_FORMATS = ("onnx", "pt2", "safetensors", "peft", "pt", "hf", "genai")  # lowrank_compiler.backends.export.FORMATS


def load_model(path: str, trust: bool = False, seq: int = 16) -> Any:
    """A GraphModule from an lrc file, a ``.pt2`` torch.export archive, or an HF model directory."""
    from lowrank_compiler.errors import LoadError
    from lowrank_compiler.formats.hf import load_hf_dir
    from lowrank_compiler.formats.load import load as lrc_load

    p = Path(path)
    if p.is_dir():
        return load_hf_dir(p, seq)
    if not p.exists():
        raise LoadError(f"{p}: no such file or directory")
    return lrc_load(p, trust=trust)


def _cmd_inspect(a: argparse.Namespace) -> int:
    from lowrank_compiler.spec.report import inspect_table

    gm = load_model(a.model, a.trust)
    print(inspect_table(gm, a.spec))
    return 0


def _cmd_transform(a: argparse.Namespace) -> int:
    from lowrank_compiler.api import print_trainable_parameters, transform
    from lowrank_compiler.formats.model import save

    gm = load_model(a.model, a.trust)
    gm = transform(gm, a.spec)
    print_trainable_parameters(gm)
    save(gm, a.output)
    print(f"wrote {a.output}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from lowrank_compiler.backends.export import export, infer_format

    fmt = infer_format(a.output, a.format)  # unknown formats fail before the model is loaded
    gm = load_model(a.model, a.trust)
    name = a.adapter_name or Path(a.model).stem
    report = export(gm, a.output, fmt, merge=a.merge, adapters_dir=a.adapters_dir, adapter_name=name,
                    extra_adapters=a.adapter, opset=a.opset, validate=not a.no_validate,
                    quantize=a.quantize, force=a.force, min_cosine=a.min_cosine, optimize=a.optimize,
                    tokenizer=a.tokenizer, gate=not a.no_gate)
    print(f"wrote {report['path']} ({fmt}{', merged' if a.merge or fmt == 'hf' else ''})")
    for p in report.get("adapters", []):
        print(f"wrote {p}")
    if "min_agreement" in report:  # a causal LM's decoder gate
        from lowrank_compiler.backends.onnx.quantize_decoder import format_decoder_report

        print(format_decoder_report(report))
    elif "quantize" in report:
        from lowrank_compiler.backends.onnx.quantize import format_report

        print(format_report(report))
    if "optimize" in report:
        from lowrank_compiler.backends.onnx.fusions import format_report as fusion_line

        print(fusion_line(report["optimize"]))
    if "max_abs_diff" in report:
        print(f"validated with ONNX Runtime on the example inputs: max |ORT - torch| = {report['max_abs_diff']:.3g}")
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from lowrank_compiler.backends.onnx.run import run_cli

    return run_cli(a)


def _cmd_demo(a: argparse.Namespace) -> int:
    from lowrank_compiler.demo.run import run_demo

    run_demo(out_dir=a.out_dir, steps=a.steps, quick=a.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree (kept separate so extensions can add options)."""
    from lowrank_compiler import __version__

    ap = argparse.ArgumentParser(prog="lrc", description="lowrank-compiler: low-rank adaptation as graph rewriting")
    ap.add_argument("--version", action="version", version=f"lrc (lowrank-compiler) {__version__}")
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
    p.add_argument("--format", default=None,
                   help=f"one of {', '.join(EXPORT_FORMATS)} (default: from the output's suffix; no suffix = peft)")
    p.add_argument("--adapters-dir", default=None,
                   help="ONNX without --merge: where <name>.onnx_adapter files go (default: beside the output)")
    p.add_argument("--adapter-name", default=None, help="name of the model's own .onnx_adapter (default: model stem)")
    p.add_argument("--adapter", action="append", default=None, metavar="FILE",
                   help="also convert this lrc adapter file / PEFT directory to an .onnx_adapter (repeatable)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 18+)")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check after export")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX: fuse attention/LayerNorm/GELU for ONNX Runtime, kept only if it matches the unfused "
                        "graph (default: on for fp32 encoders, off for decoders and --quantize)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="ONNX / genai: quantize the base weights (encoders: int8 dynamic per-channel or ORT 4-bit "
                        "MatMulNBits; causal LMs: MatMulNBits 8/4-bit); adapters stay fp32 and switchable; refused "
                        "below the accuracy gate (encoders: output cosine; causal LMs: logits cosine and greedy-token "
                        "agreement on held-out prompts, base and each adapter)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="--format genai: copy the tokenizer files from this HF folder (default: the model's own "
                        "HF directory, when it came from one)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="quantization accuracy gate (default: 0.999; causal LMs: 0.999 int8, 0.98 int4 logits cosine)")
    p.add_argument("--no-gate", action="store_true",
                   help="--quantize: skip the decoder accuracy gate (encoders: write even when it fails)")
    p.add_argument("--force", action="store_true", help="write a quantized model even if it fails the gate")
    p.add_argument("--trust", action="store_true", help="allow loading a legacy pickle")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("run", help="run an exported ONNX model in ONNX Runtime (optionally with adapters)")
    p.add_argument("model", help="an .onnx file or a --format genai folder written by `lrc export`")
    p.add_argument("--adapter", action="append", default=None, metavar="FILE", help=".onnx_adapter to activate (repeatable: one run each)")
    p.add_argument("--input", action="append", default=None, metavar="NAME=FILE.npy", help="an input array (default: random ids)")
    p.add_argument("--shape", default="2x16", help="BATCHxSEQ of the random inputs (default: 2x16)")
    p.add_argument("--vocab", type=int, default=None, help="random ids are drawn below this (default: the model's vocab)")
    p.add_argument("--providers", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    p.add_argument("--generate", type=int, default=None, metavar="N",
                   help="a causal LM exported by `lrc export`: generate N tokens with the KV cache (greedy "
                        "unless --sample)")
    p.add_argument("--eos", type=int, default=None, help="with --generate: stop a row at this token id")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="with --generate on a genai folder that has a tokenizer: a text prompt (repeatable: a batch); "
                        "prints prompt + continuation as text")
    p.add_argument("--sample", action="store_true", help="with --generate: sample (HF do_sample) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample: softmax temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample: keep the k likeliest tokens (default 50, as HF; 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus mass kept (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="with --sample: random seed (default 0; onnxruntime-genai "
                        "has its own generator: same seed, same tokens, but not torch's tokens)")
    p.add_argument("--engine", choices=("auto", "genai", "ort"), default="auto",
                   help="with --generate: onnxruntime-genai (a genai folder, when installed) or lrc's own ORT loop "
                        "(default auto: genai when it can)")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded all-MiniLM-L6-v2")
    p.add_argument("--out-dir", default=None, help="where the demo writes its files (default: a new temporary directory)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(fn=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch's own deprecation notice from deep-copying pytree specs; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
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
    except OSError as e:  # a path the OS refuses (missing, permission, is a directory, too long ...)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"lrc {a.cmd}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
