"""Schema checks for what lrc reads from files: the manifest, adapter records, adapter tensors.

Every function raises :class:`LoadError` naming the file (``source``) and the field, and returns
normalized values; nothing here trusts a type or a range it has not checked.
"""

from __future__ import annotations

import json
import math
import zipfile
from typing import Any

import torch

from lowrank_compiler.errors import LoadError, SpecError
from lowrank_compiler.methods.base import SiteInfo, get_method
from lowrank_compiler.safety.window import FileWindow, as_file

_SCALARS = (bool, int, float, str, type(None))
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what adapter tensors may be
MAX_JSON_DEPTH = 32


def _fail(source: str, what: str) -> LoadError:
    return LoadError(f"{source}: {what}")


def adapter_records(records: Any, source: str) -> list[dict[str, Any]]:
    """Validated adapter records: ``[{site: str, method: registered, args: resolved, merged: bool}]``.

    Arguments go through the method's own ``resolve_args`` (types, ranges, finiteness), so a record
    loads exactly as the same spec would have been applied.
    """

    if not isinstance(records, list):
        raise _fail(source, f"'adapters' must be a list of records, got {type(records).__name__}")
    out, seen = [], set()
    for i, r in enumerate(records):
        where = f"adapter record {i + 1}"
        if not isinstance(r, dict):
            raise _fail(source, f"{where} is not an object")
        extra = set(r) - {"site", "method", "args", "merged"}
        if extra:
            raise _fail(source, f"{where} has unknown field(s) {sorted(extra)}; valid: site, method, args, merged")
        site, method, args, merged = r.get("site"), r.get("method"), r.get("args", {}), r.get("merged", False)
        if not isinstance(site, str) or not site or len(site) > 1000:
            raise _fail(source, f"{where}: 'site' must be a non-empty string, got {site!r:.60}")
        if site in seen:
            raise _fail(source, f"{where}: site {site!r} has two adapters")
        seen.add(site)
        if not isinstance(method, str):
            raise _fail(source, f"{where}: 'method' must be a string, got {method!r:.60}")
        if type(merged) is not bool:
            raise _fail(source, f"{where}: 'merged' must be true or false, got {merged!r:.60}")
        if not isinstance(args, dict) or not all(isinstance(k, str) and isinstance(v, _SCALARS)
                                                 for k, v in args.items()):
            raise _fail(source, f"{where}: 'args' must map names to numbers, strings or booleans")
        try:
            cls = get_method(method)
            resolved = cls.resolve_args(args)
        except SpecError as e:
            raise _fail(source, f"{where} (site {site!r}): {e.reason}") from None
        out.append({"site": site, "method": method, "args": resolved, "merged": merged})
    return out


def manifest(m: Any, source: str, fmt: str, version: int) -> dict[str, Any]:
    """A validated lrc model manifest (unknown top-level keys are ignored for forward compatibility)."""
    if not isinstance(m, dict):
        raise _fail(source, "manifest.json is not a JSON object")
    if m.get("format") != fmt:
        raise _fail(source, f"manifest format {m.get('format')!r:.60}, expected {fmt!r}")
    v = m.get("version")
    if type(v) is not int or v < 1:
        raise _fail(source, f"manifest version {v!r:.30} is not a positive integer")
    if v > version:
        raise _fail(source, f"written by a newer lrc (format version {v} > {version})")
    names = m.get("input_names")
    if (not isinstance(names, list) or not names or len(names) > 256
            or not all(isinstance(n, str) and 0 < len(n) <= 200 for n in names) or len(set(names)) != len(names)):
        raise _fail(source, "manifest 'input_names' must be a non-empty list of distinct names")
    sdpa = m.get("sdpa_dropout", [])
    if not isinstance(sdpa, list) or not all(_finite_number(p) and 0 <= p < 1 for p in sdpa):
        raise _fail(source, "manifest 'sdpa_dropout' must be a list of probabilities in [0, 1)")
    const = m.get("const_kwargs", {})
    if not isinstance(const, dict) or not all(isinstance(k, str) and isinstance(x, _SCALARS)
                                              and not (isinstance(x, float) and not math.isfinite(x))
                                              for k, x in const.items()):
        raise _fail(source, "manifest 'const_kwargs' must map names to finite scalars")
    specs = m.get("specs", [])
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise _fail(source, "manifest 'specs' must be a list of strings")
    kept = _kept_fields(m, source)
    return {**m, **kept, "version": v, "input_names": names, "sdpa_dropout": [float(p) for p in sdpa],
            "const_kwargs": const, "specs": specs, "adapters": adapter_records(m.get("adapters", []), source)}


def _kept_fields(m: dict[str, Any], source: str) -> dict[str, Any]:
    """``model_class`` (a public class name; HF layout export only looks it up among transformers' model
    classes), ``hf_config`` (a bounded JSON object with a
    ``model_type``) and ``base_model_name_or_path`` (a string), each only when present."""
    out: dict[str, Any] = {}
    name = m.get("model_class")
    if name is not None:
        if not (isinstance(name, str) and name.isidentifier() and len(name) <= 200 and not name.startswith("_")):
            raise _fail(source, f"manifest 'model_class' {name!r:.60} is not a class name (a public identifier)")
        out["model_class"] = name
    base = m.get("base_model_name_or_path")
    if base is not None:
        if not isinstance(base, str) or len(base) > 4096 or "\x00" in base:
            raise _fail(source, f"manifest 'base_model_name_or_path' {base!r:.60} is not a path or hub name "
                                "(a string of at most 4096 characters)")
        out["base_model_name_or_path"] = base
    cfg = m.get("hf_config")
    if cfg is not None:
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str) or len(cfg) > 1000:
            raise _fail(source, "manifest 'hf_config' must be an object with a string 'model_type' (at most 1000 keys)")
        if json_depth(cfg) > MAX_JSON_DEPTH or len(json.dumps(cfg)) > 1 << 20:
            raise _fail(source, f"manifest 'hf_config' is nested deeper than {MAX_JSON_DEPTH} or larger than 1 MiB")
        out["hf_config"] = cfg
    return out


def json_depth(x: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: a deep value cannot exhaust the stack here)."""
    depth, stack = 0, [(x, 1)]
    while stack:
        v, d = stack.pop()
        depth = max(depth, d)
        if isinstance(v, dict):
            stack.extend((c, d + 1) for c in v.values())
        elif isinstance(v, list):
            stack.extend((c, d + 1) for c in v)
    return depth


def json_text(text: str | bytes, source: str, what: str) -> Any:
    """``json.loads(text)`` refusing malformed, non-UTF-8 or deeper-than-MAX_JSON_DEPTH input (the nesting is
    counted on the raw text before parsing, so a deep document never reaches the recursive parser)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(source, f"{what} is not UTF-8 text") from None
    depth = deepest = 0
    in_str = esc = False
    for ch in text:  # brackets inside strings don't count
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise _fail(source, f"{what} is nested {deepest} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(text)
    except ValueError as e:
        raise _fail(source, f"{what} is not valid JSON ({e})") from None


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def tensor_values(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    """Each loaded tensor has the model's dtype kind (float for float slots, else the exact dtype) and,
    when floating, only finite entries."""
    problems = []
    for k, v in expected.items():
        t = got.get(k)
        if t is None:
            continue
        if v.is_floating_point():
            if t.dtype not in FLOAT_DTYPES:
                problems.append(f"{k}: dtype {t.dtype} (expected float16, bfloat16, float32 or float64)")
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{k}: has NaN/inf entries")
        elif t.dtype != v.dtype:
            problems.append(f"{k}: dtype {t.dtype} (expected {v.dtype})")
    if problems:
        raise _fail(source, "bad adapter tensors: " + "; ".join(problems[:5])
                    + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))


def safetensors_bytes(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors payload; LoadError on anything malformed."""
    from safetensors.torch import load as st_load

    if len(data) < 8:
        raise _fail(source, "not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, 100 << 20):
        raise _fail(source, f"not a safetensors file (header claims {n} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(x, str) for x in meta.values()):
            raise ValueError("metadata must map strings to strings")
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise _fail(source, f"not a valid safetensors file ({str(e).strip().splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    return tensors, meta


def adapter_numel(method: str, args: dict[str, Any], site: SiteInfo) -> int:
    """Elements of the tensors a ``method`` adapter with ``args`` would hold at ``site``, found by building
    it on the meta device (nothing is allocated); SpecError when the method refuses the site."""
    cls = get_method(method)
    why = cls.check_site(args, site)
    if why:
        raise SpecError(why)
    with torch.device("meta"):
        mod = cls(site, **args)
    return sum(t.numel() for t in mod.state_dict().values())


def adapter_budget(records: list[dict[str, Any]], sites: dict[str, SiteInfo], held: int, source: str) -> None:
    """Refuse records whose adapters would hold more tensor elements than the file's ``held`` (checked
    before anything is allocated, so a small file cannot make lrc allocate gigabytes)."""
    want = 0
    for r in records:
        site = sites.get(r["site"])
        if site is None:
            continue  # apply_records names the missing site
        try:
            want += adapter_numel(r["method"], r["args"], site)
        except SpecError as e:
            raise _fail(source, f"site {r['site']!r}: {e.reason}") from None
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            continue  # a method that cannot be built on meta is sized by its real tensors later
        if want > held:
            raise _fail(source, f"the manifest declares adapters with more than {held} tensor elements "
                                f"(first past the limit: {r['method']} at {r['site']!r}), but the file holds {held}")


def unencrypted_zip(data: bytes | FileWindow, source: str) -> None:
    """Refuse a zip with an encrypted-flag member (``zipfile`` would raise a bare RuntimeError on reading it;
    lrc and torch.export never encrypt). Other zip faults are left to the archive reader."""
    try:
        infos = zipfile.ZipFile(as_file(data)).infolist()
    except Exception:  # noqa: BLE001  (the archive reader reports a malformed zip in one line)
        return
    bad = [i.filename for i in infos if i.flag_bits & 0x1]
    if bad:
        raise _fail(source, f"zip member {bad[0]!r:.80} is encrypted (lrc files are never encrypted)")
