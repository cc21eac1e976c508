"""What training changes, as state-dict keys: the HF ``Trainer``'s checkpoints of an lrc model hold only that.

``transformers.Trainer`` saves a model that is not a ``PreTrainedModel`` as ``save_file(model.state_dict())`` and
resumes with ``model.load_state_dict(sd, strict=False)``. :class:`~lowrank_compiler.frontend.module.LrcGraphModule`
answers the Trainer's ``state_dict()`` call (recognised by its caller, ``Trainer._save``) with the keys below only,
so a checkpoint is megabytes where the base model is gigabytes, like PEFT's; every other ``state_dict()`` call is
torch's complete one. Loading a dict that holds exactly these keys is complete (strict loading accepts it).

Why a stack frame: the Trainer offers no hook between "which tensors" and "write them" for a model that is not a
``PreTrainedModel`` (a callback's ``on_save`` runs after the file is written: rewriting it would still write the
gigabytes first), and patching ``Trainer`` would change it for every model. The frame is recognised by the code
object of ``transformers.Trainer._save`` itself (a subclass calling ``super()._save`` is the same code; a subclass's
own ``_save`` is recognised by its name and its ``self``); if a
transformers release drops or reshapes ``Trainer._save`` (no ``state_dict`` call in it), :func:`trainer_save_known`
warns once (``LrcWarning``: checkpoints would hold the whole model) and ``tests/training/test_trainer_checkpoint.py``
fails, instead of checkpoints silently growing to the full model.
"""

from __future__ import annotations

import sys
import warnings

from torch import fx

from lowrank_compiler.ir import META_KEY, NAMED_ROOT, adapter_nodes, adapter_sites
from lowrank_compiler.passes.full import full_parameters


def trained_keys(gm: fx.GraphModule) -> set[str]:
    """State-dict keys of every tensor training can change: adapter modules (active and named sets, parameters and
    buffers), ``full`` modules, parameters that require grad, and base weights a method moves (LoRA-GA, Delta-LoRA)."""
    prefixes = [n.meta[META_KEY].module_path + "." for n in adapter_nodes(gm)] + [NAMED_ROOT + "."]
    keys = set(full_parameters(gm))
    keys |= {mark.weight_path for _, mark, mod in adapter_sites(gm) if mod.modifies_base}
    keys |= {n for n, p in gm.named_parameters() if p.requires_grad}
    for name, _ in (*gm.named_parameters(), *gm.named_buffers()):
        if name.startswith(tuple(prefixes)):
            keys.add(name)
    return keys


class LrcWarning(UserWarning):
    """lrc cannot give the behaviour it documents here (e.g. adapters-only Trainer checkpoints)."""


_known: dict[int, object] = {}  # id(Trainer class) -> the code object of its _save (None: not recognised)


def trainer_save_code() -> object | None:
    """The code object of ``transformers.Trainer._save`` when transformers' trainer is imported and its ``_save``
    still reads ``self.model.state_dict()``; None otherwise (warns once per Trainer class when it does not)."""
    mod = sys.modules.get("transformers.trainer")
    trainer = getattr(mod, "Trainer", None)
    if trainer is None:
        return None
    if id(trainer) not in _known:
        code = getattr(getattr(trainer, "_save", None), "__code__", None)
        ok = code is not None and "state_dict" in code.co_names
        _known[id(trainer)] = code if ok else None
        if not ok:
            version = getattr(sys.modules.get("transformers"), "__version__", "?")
            warnings.warn(f"lrc: transformers {version}'s Trainer has no _save that calls model.state_dict(); lrc "
                          "cannot recognise its checkpoint writes, so Trainer checkpoints of lrc models hold the whole "
                          "model (use gm.save_pretrained(dir) for adapters-only files)", LrcWarning, stacklevel=3)
    return _known[id(trainer)]


def trainer_save_known() -> bool:
    """True when lrc recognises the Trainer's checkpoint write in the installed transformers (or none is imported)."""
    return "transformers.trainer" not in sys.modules or trainer_save_code() is not None


def called_by_trainer_save(depth: int = 2) -> bool:
    """True when the frame ``depth`` levels up runs ``transformers.Trainer._save`` (its checkpoint write), or a
    ``_save`` of a ``Trainer`` subclass that overrides it."""
    code = trainer_save_code()
    if code is None:
        return False
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return False
    if frame.f_code is code:
        return True
    trainer = sys.modules["transformers.trainer"].Trainer
    return frame.f_code.co_name == "_save" and isinstance(frame.f_locals.get("self"), trainer)
