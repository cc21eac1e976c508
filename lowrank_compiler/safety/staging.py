"""Load a validated torch.export archive without staging its weights in memory.

:func:`.pt2.sanitize_pt2` validates everything and rebuilds the archive with the weights declared on the
meta device; ``torch.export.load`` then reads only the program. Each weight payload is copied once, straight
from the file into its tensor (CRC-checked), and the program's meta tensors are swapped for them, keeping
aliasing (views of one payload stay views of one tensor). Peak memory: the weights, once.
"""

from __future__ import annotations

import io

import torch

from lowrank_compiler.errors import LoadError
from lowrank_compiler.safety import pt2
from lowrank_compiler.safety.window import FileWindow


def load_exported_program_staged(data: FileWindow, source: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of the archive ``data`` (a window on a file), weights read once into place."""
    staged: dict[str, FileWindow] = {}
    clean = pt2.sanitize_pt2(data, source, staged)
    try:
        with pt2.quiet_torch():
            ep = torch.export.load(io.BytesIO(clean))
    except Exception as e:  # noqa: BLE001  (torch raises many types on inconsistent programs)
        raise LoadError(f"{source}: the torch.export program could not be loaded "
                        f"({type(e).__name__}: {pt2._short(e)})") from None
    flat = {}
    for path, win in staged.items():
        buf = torch.empty(len(win), dtype=torch.uint8)
        win.read_into(buf, win.crc, f"{source}: {path}")  # type: ignore[attr-defined]
        flat[path] = buf
    _fill(ep, _weight_paths(data, source), flat)
    return ep


def _weight_paths(data: FileWindow, source: str) -> dict[str, str]:
    z = pt2.open_zip(data, source)
    cfg = [n for n in z.namelist() if n.endswith("_weights_config.json") and "/data/weights/" in n]
    return {fqn: e["path_name"] for fqn, e in pt2.read_json(z, cfg[0], source)["config"].items()}


def _fill(ep: torch.export.ExportedProgram, paths: dict[str, str], flat: dict[str, torch.Tensor]) -> None:
    """Replace each meta tensor of ``ep.state_dict`` by the same view of its payload's bytes."""
    state = ep.state_dict
    for fqn, meta in list(state.items()):
        buf = flat[paths[fqn]]
        elt = meta.element_size()
        if buf.numel() % elt:
            raise LoadError(f"weight {fqn!r}: its payload is not a whole number of {meta.dtype} elements")
        t = buf.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())
        state[fqn] = torch.nn.Parameter(t, requires_grad=meta.requires_grad) if isinstance(
            meta, torch.nn.Parameter) else t
