"""Validate untrusted zip / torch.export archives before anything of torch deserializes them.

The rule (docs/DESIGN_NOTES.md, "Loading untrusted files"): a ``.pt2`` archive is read member by
member with bounded readers, every member must be one torch.export.save writes, nothing in it is
ever unpickled (the pickled sample-inputs member is not read at all: the rebuilt archive holds it
empty), every name that torch.fx could paste into generated Python passes :mod:`.names`, every
symbolic shape expression passes :mod:`.symexpr`'s grammar, every graph node calls an ATen/prims op
(or one of a few arithmetic builtins), and then a *rebuilt* archive holding only the validated
members (sample inputs emptied, guard code dropped) goes to ``torch.export.load``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from lowrank_compiler.errors import LoadError
from lowrank_compiler.safety.names import check_path
from lowrank_compiler.safety.symexpr import ExprRefused, check_expr
from lowrank_compiler.safety.window import FileWindow, as_file, member_window, weights_on_meta

MAX_MEMBERS = 200_000
MAX_JSON_BYTES = 1 << 30  # a serialized program / config larger than this is refused

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FIXED = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little"}
_DIGITS = {".data/version", ".data/serialization_id"}
_ATEN = re.compile(rf"torch\.ops\.(aten|prims)\.{_IDENT}\.{_IDENT}\Z")
_TARGETS = frozenset(
    [f"_operator.{n}" for n in "getitem add sub mul floordiv truediv mod neg pow eq ne lt le gt ge and_ or_ "
                              "not_ pos abs".split()]
    + [f"torch.{n}" for n in "sym_float sym_int sym_max sym_min sym_not sym_ite sym_sum _sym_sqrt".split()]
    + [f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")]
    + ["torch.ops.higher_order.wrap_with_set_grad_enabled", "torch.ops.higher_order.wrap_with_autocast"])

# -- bounded zip reading ---------------------------------------------------------------------------
def open_zip(data: bytes | FileWindow, source: str) -> zipfile.ZipFile:
    """A ZipFile over ``data`` whose members are all stored (uncompressed) and fit inside ``data``.

    lrc and torch.export write every member uncompressed, so a compressed member (which could inflate
    to any size: a zip bomb) is refused, and no member can claim more bytes than the file holds.
    """
    _check_ends(data, source)
    try:
        z = zipfile.ZipFile(as_file(data))
        infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
            UnicodeDecodeError) as e:
        raise LoadError(f"{source}: not a readable zip archive ({_short(e)})") from None
    if len(infos) > MAX_MEMBERS:
        raise LoadError(f"{source}: {len(infos)} zip members (at most {MAX_MEMBERS})")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        if name in seen:
            raise LoadError(f"{source}: zip member {name!r} appears twice")
        seen.add(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise LoadError(f"{source}: zip member {name!r} is compressed; lrc and torch.export write members "
                            "uncompressed, and a compressed member could inflate far beyond the file's size")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > len(data):
            raise LoadError(f"{source}: zip member {name!r} declares {info.file_size} bytes, more than the file "
                            f"holds ({len(data)} bytes)")
        total += info.file_size
    if total > len(data):
        raise LoadError(f"{source}: zip members declare {total} bytes in all, more than the file holds")
    return z


def _check_ends(data: bytes, source: str) -> None:
    """The archive starts with a member and its end record is the file's last bytes (no truncation,
    no prefix or trailing data, no end record borrowed from a nested archive)."""
    idx = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 65535))
    if data[:4] not in (b"PK\x03\x04", b"PK\x05\x06") or idx < 0 or len(data) < idx + 22:
        raise LoadError(f"{source}: not a complete zip archive (truncated or not a zip)")
    comment = int.from_bytes(data[idx + 20:idx + 22], "little")
    size_cd, offset_cd = int.from_bytes(data[idx + 12:idx + 16], "little"), int.from_bytes(data[idx + 16:idx + 20], "little")
    if idx + 22 + comment != len(data):
        raise LoadError(f"{source}: not a complete zip archive (truncated, or data after its end)")
    if 0xFFFFFFFF not in (size_cd, offset_cd) and offset_cd + size_cd != idx and not (
            idx >= 20 and data[idx - 20:idx - 16] == b"PK\x06\x07"):
        raise LoadError(f"{source}: zip central directory does not end where the end record says")


def read_member(z: zipfile.ZipFile, name: str, source: str) -> bytes:
    """The bytes of one member, read with a bound (never more than it declares) and CRC-checked."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise LoadError(f"{source}: missing zip member {name!r}") from None
    try:
        with z.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        raise LoadError(f"{source}: zip member {name!r} is corrupt or encrypted ({_short(e)})") from None
    if len(data) != info.file_size:
        raise LoadError(f"{source}: zip member {name!r} holds {len(data)} bytes, not the {info.file_size} "
                        "it declares")
    return data


def read_json(z: zipfile.ZipFile, name: str, source: str) -> Any:
    """A JSON member parsed (LoadError on bad UTF-8, bad JSON, or nesting too deep)."""
    if name in z.namelist() and z.getinfo(name).file_size > MAX_JSON_BYTES:
        raise LoadError(f"{source}: {name} is larger than {MAX_JSON_BYTES} bytes")
    raw = read_member(z, name, source)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LoadError(f"{source}: {name} is not valid JSON ({_short(e)})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def one_line(msg: str) -> str:
    """A multi-line message (problem lists, spec carets) joined into one line."""
    lines = [ln.strip(" -") for ln in msg.splitlines()]
    return "; ".join(ln for ln in lines if ln and set(ln) != {"^"})


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# -- torch.export archives -------------------------------------------------------------------------
def sanitize_pt2(data: bytes | FileWindow, source: str, staged: dict[str, FileWindow] | None = None) -> bytes:
    """A rebuilt torch.export archive holding only validated members; LoadError on anything unsafe.

    With ``staged`` (a dict to fill), weight payloads are not copied: each becomes an empty member, its
    weights are declared on the meta device, and ``staged`` maps ``weight_<n>`` to a window on its bytes
    (see :func:`load_exported_program_staged`).
    """
    z = open_zip(data, source)
    names = z.namelist()
    if not names:
        raise LoadError(f"{source}: empty zip archive")
    prefix = names[0].split("/", 1)[0]
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", prefix) or prefix in (".", ".."):
        raise LoadError(f"{source}: archive root folder {prefix!r} is not a plain name")
    rel: dict[str, str] = {}
    for n in names:
        if not n.startswith(prefix + "/"):
            raise LoadError(f"{source}: member {n!r} is outside the archive's root folder {prefix!r}")
        if not n.endswith("/"):
            rel[n[len(prefix) + 1:]] = n
    models = [r for r in rel if r.startswith("models/")]
    if len(models) != 1 or not re.fullmatch(rf"models/{_IDENT}\.json", models[0]):
        raise LoadError(f"{source}: expected exactly one models/<name>.json in the torch.export archive, "
                        f"found {models[:3]}")
    model = models[0][len("models/"):-len(".json")]
    wcfg, ccfg = f"data/weights/{model}_weights_config.json", f"data/constants/{model}_constants_config.json"
    sample = f"data/sample_inputs/{model}.pt"
    for r in (wcfg, ccfg, "archive_format", "archive_version"):
        if r not in rel:
            raise LoadError(f"{source}: the torch.export archive has no {r}")
    out: dict[str, bytes] = {}
    for r, value in _FIXED.items():
        if r in rel:
            got = read_member(z, rel[r], source).strip()
            if got != value:
                raise LoadError(f"{source}: {r} is {got[:20]!r}, expected {value.decode()!r}")
            out[r] = got
    for r in _DIGITS & rel.keys():
        got = read_member(z, rel[r], source).strip()
        if not (got.isdigit() and len(got) <= 64):
            raise LoadError(f"{source}: {r} is not a number")
        out[r] = got
    weights = _payload_config(read_json(z, rel[wcfg], source), "weights", "weight_", source)
    constants = _payload_config(read_json(z, rel[ccfg], source), "constants", "tensor_", source)
    blobs = {f"data/weights/{p}" for p in weights} | {f"data/constants/{p}" for p in constants}
    known = set(out) | {models[0], wcfg, ccfg, sample} | blobs
    for r in rel:
        if r.endswith(".pt") and r != sample:
            raise LoadError(f"{source}: archive member {r} is a pickle (legacy torch.export format); "
                            "lrc never unpickles; re-save the program with a current torch.export.save")
        if r not in known:
            raise LoadError(f"{source}: unexpected archive member {r!r}; a torch.export.save archive holds only "
                            "the program JSON, weight/constant payloads and their configs")
    for blobset, cfg, folder in ((weights, "weights", "data/weights/"), (constants, "constants", "data/constants/")):
        for path, need in blobset.items():
            r = folder + path
            if r not in rel:
                raise LoadError(f"{source}: {cfg} config names {path!r}, which the archive lacks")
            if z.getinfo(rel[r]).file_size < need:
                raise LoadError(f"{source}: {cfg} payload {path!r} holds fewer bytes than its tensor needs")
            if staged is not None and cfg == "weights":
                staged[path] = member_window(z, rel[r], source)
                out[r] = b""
                continue
            out[r] = read_member(z, rel[r], source)
    program = read_json(z, rel[models[0]], source)
    check_program(program, source)
    program["guards_code"] = []  # Python source torch would exec() when guards are checked
    out[models[0]] = json.dumps(program).encode()
    out[wcfg] = read_member(z, rel[wcfg], source) if staged is None else weights_on_meta(read_json(z, rel[wcfg], source))
    out[ccfg] = read_member(z, rel[ccfg], source)
    out[sample] = b""  # never unpickled: lrc keeps example inputs in safetensors
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as w:
        for r, payload in out.items():
            w.writestr(f"{prefix}/{r}", payload)
    return buf.getvalue()


def _payload_config(cfg: Any, what: str, file_prefix: str, source: str) -> dict[str, int]:
    """Validate a weights/constants config; ``{payload file: bytes its tensors need}``."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("config"), dict):
        raise LoadError(f"{source}: the {what} config is not an object with a 'config' map")
    from torch._export.serde.schema import ScalarType

    dtypes = {int(v.value) for v in ScalarType}
    need: dict[str, int] = {}
    for fqn, entry in cfg["config"].items():
        check_path(fqn, f"{source}: {what} config")
        where = f"{source}: {what} entry {fqn!r}"
        if not isinstance(entry, dict):
            raise LoadError(f"{where} is not an object")
        if entry.get("use_pickle") is not False:
            raise LoadError(f"{where} is stored as a pickle (use_pickle), which can run code when loaded; "
                            "lrc never unpickles")
        path = entry.get("path_name")
        if not (isinstance(path, str) and re.fullmatch(rf"{file_prefix}\d{{1,9}}", path)):
            raise LoadError(f"{where}: payload name {path!r} is not {file_prefix}<n>")
        meta = entry.get("tensor_meta")
        if not isinstance(meta, dict) or not isinstance(entry.get("is_param", False), bool):
            raise LoadError(f"{where}: missing tensor metadata")
        dtype = meta.get("dtype")
        if type(dtype) is not int or dtype not in dtypes or dtype == 0:
            raise LoadError(f"{where}: unknown dtype code {dtype!r}")
        sizes, strides = _ints(meta.get("sizes"), where), _ints(meta.get("strides"), where)
        offset = _ints([meta.get("storage_offset")], where)[0]
        if len(sizes) != len(strides) or len(sizes) > 16:
            raise LoadError(f"{where}: sizes and strides don't match")
        if (meta.get("device") or {}).get("type") not in ("cpu", "cuda", "meta"):
            raise LoadError(f"{where}: unknown device {meta.get('device')!r}")
        if all(s > 0 for s in sizes):
            elt = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
            span = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1
            need[path] = max(need.get(path, 0), span * elt)
        else:
            need.setdefault(path, 0)
    return need


def _torch_dtype(code: int) -> torch.dtype:
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    return _SERIALIZE_TO_TORCH_DTYPE[ScalarType(code)]


def _ints(items: Any, where: str) -> list[int]:
    if not isinstance(items, list):
        raise LoadError(f"{where}: malformed tensor metadata")
    out = []
    for it in items:
        v = it.get("as_int") if isinstance(it, dict) else None
        if type(v) is not int or not 0 <= v < 1 << 48:
            raise LoadError(f"{where}: a stored tensor needs concrete non-negative sizes, got {it!r}")
        out.append(v)
    return out


#: program fields whose strings are not names: each is checked by its own rule below, dropped
#: (guards_code), or only ever repr()'d by fx (as_string); node "metadata" values never reach code
_NOT_NAMES = frozenset({"expr_str", "target", "as_operator", "torch_version", "guards_code", "as_string",
                        "as_strings", "in_spec", "out_spec"})


def check_program(program: Any, source: str) -> None:
    """Refuse a serialized program that names non-ATen callables, custom objects, odd expressions, or
    any name (key or value) that is not a dotted identifier path (:mod:`.names`)."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise LoadError(f"{source}: the serialized program is not a torch.export program")
    for key, value, free in _walk(program, source):
        if key == "expr_str":
            try:
                check_expr(value)
            except ExprRefused as e:
                raise LoadError(f"{source}: refused symbolic shape expression {str(value)[:60]!r}: {e}") from None
        elif key in ("target", "as_operator") and isinstance(value, str):
            if not (_ATEN.match(value) or value in _TARGETS):
                raise LoadError(f"{source}: the program calls {value[:80]!r}, which is not an ATen operator; "
                                "lrc loads only graphs of ATen/prims ops")
        elif key in ("as_custom_obj", "custom_obj_values", "as_custom_objs") and value:
            raise LoadError(f"{source}: the program holds custom (TorchBind) objects, which are pickles")
        elif key in ("in_spec", "out_spec") and not free:
            _check_treespec(value, f"{source}: {key}")
        elif isinstance(value, str) and not free and key not in _NOT_NAMES:
            check_path(value, f"{source}: program field {key!r}", empty=key == "fqn")


def _walk(obj: Any, source: str) -> Iterator[tuple[str, Any, bool]]:
    """(key, value, under node metadata) for every dict entry (list items inherit their list's key);
    every dict key outside node metadata must be a name path."""
    stack: list[tuple[str, Any, int, bool]] = [("", obj, 0, False)]
    while stack:
        key, o, d, free = stack.pop()
        if d > 200:
            raise LoadError(f"{source}: the serialized program is nested too deeply")
        if isinstance(o, dict):
            for k, v in o.items():
                if not free:
                    check_path(k, f"{source}: program key")
                yield k, v, free
                if isinstance(v, (dict, list)):
                    stack.append((k, v, d + 1, free or k == "metadata"))
        else:
            for v in o:
                if isinstance(v, (dict, list)):
                    stack.append((key, v, d + 1, free))
                else:
                    yield key, v, free


def _check_treespec(text: Any, where: str) -> None:
    """A serialized pytree spec (fx pastes its dict keys into ``forward``): every string in it, and in
    the JSON contexts nested inside it, is a name path."""
    todo: list[tuple[Any, int]] = [(text, 0)]
    while todo:
        o, d = todo.pop()
        if d > 64:
            raise LoadError(f"{where}: the pytree spec is nested too deeply")
        if isinstance(o, str) and (d == 0 or o[:1] in "[{"):
            try:
                o = json.loads(o, parse_constant=_no_constant)
            except (ValueError, RecursionError) as e:
                raise LoadError(f"{where}: the pytree spec is not valid JSON ({_short(e)})") from None
            todo.append((o, d + 1))
        elif isinstance(o, str):
            check_path(o, where)
        elif isinstance(o, dict):
            for k, v in o.items():
                check_path(k, where)
                todo.append((v, d + 1))
        elif isinstance(o, list):
            todo.extend((v, d + 1) for v in o)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch.export's logged tracebacks and warnings while it reads a validated archive."""
    logger = logging.getLogger("torch.export")
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(old)


def load_exported_program(data: bytes, source: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a validated, rebuilt copy of ``data``; every failure is a LoadError."""
    clean = sanitize_pt2(data, source)
    try:
        with quiet_torch():
            return torch.export.load(io.BytesIO(clean))
    except Exception as e:  # noqa: BLE001  (torch raises many types on inconsistent programs)
        raise LoadError(f"{source}: the torch.export program could not be loaded "
                        f"({type(e).__name__}: {_short(e)})") from None
