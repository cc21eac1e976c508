"""What training changes, as state-dict keys: the HF ``Trainer``'s checkpoints of an lrc model hold only that.

``transformers.Trainer`` saves a model that is not a ``PreTrainedModel`` as ``save_file(model.state_dict())`` and
resumes with ``model.load_state_dict(sd, strict=False)``. :class:`~lowrank_compiler.frontend.module.LrcGraphModule`
answers the Trainer's ``state_dict()`` call (recognised by its caller, ``Trainer._save``) with the keys below only,
so a checkpoint is megabytes where the base model is gigabytes, like PEFT's; every other ``state_dict()`` call is
torch's complete one. Loading a dict that holds exactly these keys is complete (strict loading accepts it).
"""

from __future__ import annotations

import sys

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


def called_by_trainer_save(depth: int = 2) -> bool:
    """True when the frame ``depth`` levels up is ``transformers``' ``Trainer._save`` (its checkpoint write)."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return False
    return frame.f_code.co_name == "_save" and str(frame.f_globals.get("__name__", "")).startswith("transformers.")
