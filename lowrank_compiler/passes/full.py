"""Train whole modules (``PATTERN:full``, PEFT's ``modules_to_save``): give them their own trainable parameters."""

from __future__ import annotations

from copy import deepcopy

from torch import fx, nn

from lowrank_compiler.errors import SpecError
from lowrank_compiler.ir import lrc_meta
from lowrank_compiler.passes.manager import PassResult


def full_parameters(gm: fx.GraphModule) -> dict[str, nn.Parameter]:
    """``{"<module path>.<param name>": parameter}`` of every fully trained module, in record order."""
    out: dict[str, nn.Parameter] = {}
    for path in lrc_meta(gm).get("full_modules", []):
        for name, p in gm.get_submodule(path).named_parameters():
            out[f"{path}.{name}"] = p
    return out


def train_full(gm: fx.GraphModule) -> PassResult:
    """Make every module in ``lrc_meta(gm)["full_modules"]`` trainable.

    The first time, the module is replaced by a copy (its parameters may be shared with the user's
    model, which training must not change; a weight tied to a module outside it is untied, as in
    PEFT's ``modules_to_save``). The copy's parameters require grad and are listed in
    ``lrc_meta(gm)["trainable_extra"]``, which freezing and ``ir.verify`` respect. Modules already
    handled are left alone: ``modified=False``.
    """
    meta = lrc_meta(gm)
    extra = list(meta.get("trainable_extra", ()))
    done = {id(p) for p in extra}
    modified = False
    for path in meta.get("full_modules", []):
        try:
            mod = gm.get_submodule(path)
        except AttributeError:
            raise SpecError(f"no module {path!r} to train fully in this model") from None
        if all(id(p) in done for p in mod.parameters()):
            continue
        copy = deepcopy(mod)
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, copy)
        for p in copy.parameters():
            p.requires_grad_(True)
            extra.append(p)
            done.add(id(p))
        modified = True
    meta["trainable_extra"] = extra
    return PassResult(gm, modified)
