"""Training a transformed graph on several processes: DDP, FSDP2 (``fully_shard``), rank-0 checkpoints.

Launch with ``torchrun --nproc-per-node N train.py`` (or ``torch.multiprocessing.spawn``); every rank
builds the same model and calls ``lrc.transform`` on it (a data-dependent init such as LoRA-GA sees each
rank's own batches and all-reduces its statistics, so every rank gets the same A0/B0), then wraps it:
    gm = lrc.transform(model, spec, example_inputs=(ids,))
    gm = lrc.training.distributed.fsdp(gm)            # or: model = lrc.training.distributed.ddp(gm); gm = model.module
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=2e-4)
    ... loss = loss_fn(gm(**batch)); loss.backward(); opt.step(); opt.zero_grad()
    lrc.training.distributed.save_adapters(gm, "adapters.safetensors")   # every rank calls, rank 0 writes

FSDP2 units: a traced GraphModule reads every base weight with a ``get_attr`` node of its root
``forward``; the submodules that own the weights (``encoder.layer.3``) are never called, so a
``fully_shard`` on them would never unshard. ``fsdp(gm)`` shards the root as one unit (every
parameter all-gathered for the whole forward); ``fsdp(gm, per_block=True)`` first outlines each
block into a called submodule (``lowerings/outline.py``) so each block is its own unit and only one
is unsharded at a time. Either way parameters, gradients and optimizer state are sharded at rest,
and frozen base weights get no gradient and no reduce-scatter.

HF ``Trainer`` under torchrun: pass the LrcGraphModule as ``model``; the Trainer wraps it in DDP
itself. ``trainer.save_model()`` writes its ``state_dict`` (tied tensors once) on rank 0; it loads
with ``gm.load_state_dict(safetensors.torch.load_file(...))`` into a fresh transform.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from lowrank_compiler.errors import LrcError
from lowrank_compiler.formats import model as _formats
from lowrank_compiler.ir import META_KEY, adapter_nodes, lrc_meta
from lowrank_compiler.lowerings.outline import borrow_units, outline_blocks
from lowrank_compiler.methods.base import AdapterMethod

__all__ = ["ddp", "fsdp", "is_sharded", "full_copy", "save", "save_adapters", "rank", "world_size", "barrier"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialized)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes (1 when torch.distributed is not initialized)."""
    return dist.get_world_size() if _initialized() else 1


def barrier() -> None:
    """``dist.barrier()`` when initialized, else nothing."""
    if _initialized():
        dist.barrier()


def _need_pg(what: str) -> None:
    if not _initialized():
        raise LrcError(f"{what} needs torch.distributed: call torch.distributed.init_process_group(...) first "
                       "(torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; backend 'gloo' on CPU, 'nccl' on GPU)")


def _check_gm(gm: Any, what: str) -> None:
    if not isinstance(gm, fx.GraphModule):
        raise LrcError(f"{what} needs the GraphModule from lrc.transform / lrc.load, got {type(gm).__name__}")


def ddp(gm: fx.GraphModule, **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(gm, **kwargs)``: gradients of the adapter parameters are averaged.

    Only parameters that require grad (the adapters) are bucketed, so the frozen base costs no
    communication. Build the optimizer on ``result.module`` (the GraphModule; ``lrc.optimizer``), save
    with ``save_adapters(result.module, ...)``. Every method works (the step rules run on each rank on
    identical, all-reduced gradients, so ranks stay in sync).

    Raises:
        LrcError: torch.distributed is not initialized, or ``gm`` is not a GraphModule.
    """
    _need_pg("lrc.training.distributed.ddp")
    _check_gm(gm, "lrc.training.distributed.ddp")
    return nn.parallel.DistributedDataParallel(gm, **kwargs)


def _overrides(ad: AdapterMethod, name: str) -> bool:
    return getattr(type(ad), name) is not getattr(AdapterMethod, name)


def fsdp(gm: fx.GraphModule, *, per_block: bool = False, reshard_after_forward: bool = True,
         mp_policy: Any = None, offload_policy: Any = None) -> fx.GraphModule:
    """Shard ``gm`` with FSDP2 (``torch.distributed.fsdp.fully_shard``) in place; returns the module to
    forward through.

    Parameters become ``DTensor`` shards (dim 0 over the ranks); ``forward`` all-gathers them, and
    after backward the adapter gradients are reduce-scattered (averaged). Build the optimizer after
    this call (``lrc.optimizer(gm, ...)``). Methods whose optimizer step reads the full base weight
    (``transform_grads`` / ``after_step``: LoRA-FA, LoRA-Pro, Delta-LoRA, LoRASC) are refused: on a
    shard those rules would compute with 1/N of the weight. Use :func:`ddp` for them.

    ``per_block=False`` shards the whole graph as one unit and returns ``gm``. ``per_block=True``
    outlines each numbered block (``encoder.layer.3``), and what runs before (embeddings) and after
    (head) the blocks, into called submodules (:func:`lowrank_compiler.lowerings.outline.outline_blocks`),
    makes each an FSDP2 unit, and returns that outlined module: forward through it with any call ``gm``
    serves (``labels=``, no mask ...: another signature's graph is traced on first use, outlined the same
    way and run through the same units, :func:`~lowrank_compiler.lowerings.outline.borrow_units`), while
    ``gm`` holds the same sharded parameters (optimizer, ``save``, ``full_copy``). Only one unit is then
    unsharded at a time.

    Raises:
        LrcError: torch.distributed is not initialized, ``gm`` is not a GraphModule, a method's
            step rule needs the full base weight, or (``per_block``) the graph has no numbered blocks.
    """
    from torch.distributed.fsdp import fully_shard

    _check_gm(gm, "lrc.training.distributed.fsdp")
    bad = []
    for node in adapter_nodes(gm):
        mark = node.meta[META_KEY]
        ad = gm.get_submodule(mark.module_path)
        if _overrides(ad, "transform_grads") or _overrides(ad, "after_step"):
            bad.append(f"{mark.site} ({mark.method})")
    if bad:
        raise LrcError(f"FSDP2 cannot run the optimizer-step rules of {', '.join(bad[:4])}"
                       f"{' ...' if len(bad) > 4 else ''}: they read the full base weight, which FSDP2 keeps "
                       "sharded between steps; use lrc.training.distributed.ddp(gm) for these methods")
    _need_pg("lrc.training.distributed.fsdp")
    kw: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    if offload_policy is not None:
        kw["offload_policy"] = offload_policy
    if not per_block:
        slots = _slots(gm)
        fully_shard(gm, **kw)
        _remap_extra(gm, slots)
        return gm

    top, units = outline_blocks(gm)
    if getattr(gm, "lrc_face", None) is not None:  # every call gm serves (labels=, no mask ...), through these units
        outlined = top
        top = gm.lrc_derive(top, lambda variant: borrow_units(outlined, variant))
    slots = _slots(top)
    sharded = []
    for name in units:
        unit = top.get_submodule(name)
        if any(True for _ in unit.parameters()):
            fully_shard(unit, **kw)
            sharded.append((name, unit))
    fully_shard(top, **kw)  # the root: a weight read by several units (tied), and the coordination
    for (_, unit), (prev_name, prev) in zip(sharded[1:], sharded):
        # backward prefetches the previous block only: FSDP2's default would also all-gather the
        # embeddings (lrc_pre) in backward, which frozen embeddings never need ([] means "default";
        # prefetching a unit that is already unsharded is a no-op)
        unit.set_modules_to_backward_prefetch([prev if prev_name.startswith("lrc_block_") else unit])
    for mod in gm.modules():  # gm's holders get the sharded parameters the outlined module now uses
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in slots:
                owner, attr = slots[id(p)]
                mod._parameters[name] = owner._parameters[attr]
    _remap_extra(gm, slots)
    lrc_meta(top)["flat"] = gm  # save / save_adapters / full_copy of the outlined module use gm
    return top


def _slots(root: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``{id(parameter): (owning module, name)}`` of every parameter under ``root`` (before sharding replaces them)."""
    return {id(p): (mod, name) for mod in root.modules() for name, p in mod._parameters.items() if p is not None}


def _remap_extra(gm: fx.GraphModule, slots: dict[int, tuple[nn.Module, str]]) -> None:
    """The ``full`` modules' trainable parameters listed in gm's meta become the sharded ones: the graphs traced
    later for other call signatures then share the head instead of copying it (``passes/full.py``)."""
    meta = lrc_meta(gm)
    if meta.get("trainable_extra"):
        meta["trainable_extra"] = [slots[id(p)][0]._parameters[slots[id(p)][1]] if id(p) in slots else p
                                   for p in meta["trainable_extra"]]


def is_sharded(gm: nn.Module) -> bool:
    """True when ``gm`` holds FSDP2 (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in gm.parameters())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _set(root: nn.Module, path: str, value: torch.Tensor, param: bool) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if param:
        owner._parameters[name] = nn.Parameter(value, requires_grad=value.requires_grad)
    else:
        owner._buffers[name] = value


def full_copy(gm: nn.Module) -> fx.GraphModule:
    """A plain GraphModule with full (gathered) copies of every parameter and buffer of ``gm``.

    Collective under FSDP2: every rank must call it (each gets the copy). Unwraps DDP. Without
    sharding it is a deep copy. The copy is an ordinary lrc graph: ``lrc.save``, ``lrc.merge``,
    ``lrc.export`` and ``lrc.save_adapters`` work on it, and it loads on any number of processes.
    """
    import copy

    gm = _unwrap(gm)
    _check_gm(gm, "lrc.training.distributed.full_copy")
    if not is_sharded(gm):
        return copy.deepcopy(gm)
    plain = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="GraphModule")
    plain.meta = copy.deepcopy(dict(getattr(gm, "meta", {})))
    # called submodules (adapters ...) are shared with gm: give the copy its own, then full tensors
    originals = {id(m) for m in gm.modules()}
    for path, mod in list(plain.named_modules()):
        if path and id(mod) in originals:
            owner_path, _, name = path.rpartition(".")
            owner = plain.get_submodule(owner_path) if owner_path else plain
            setattr(owner, name, copy.copy(mod))
            m = getattr(owner, name)
            m._parameters, m._buffers, m._modules = dict(mod._parameters), dict(mod._buffers), dict(mod._modules)
    for path, p in list(gm.named_parameters(remove_duplicate=False)):
        if _has(plain, path):
            _set(plain, path, _full(p.detach()).clone().requires_grad_(p.requires_grad), True)
    for path, b in list(gm.named_buffers(remove_duplicate=False)):
        if _has(plain, path):
            _set(plain, path, _full(b).clone(), False)
    plain.train(gm.training)
    return plain


def _has(root: nn.Module, path: str) -> bool:
    owner_path, _, name = path.rpartition(".")
    try:
        owner = root.get_submodule(owner_path) if owner_path else root
    except AttributeError:
        return False
    return name in owner._parameters or name in owner._buffers


def save_adapters(gm: nn.Module, path: str | os.PathLike) -> None:
    """``lrc.save_adapters`` of a DDP- or FSDP2-wrapped graph: every rank calls, rank 0 writes.

    The file is the ordinary single-process format (full tensors): it loads with
    ``lrc.load_adapters`` into any process count, including a plain single-process model.
    """
    full = full_copy(gm) if is_sharded(_unwrap(gm)) else _unwrap(gm)
    if rank() == 0:
        _formats.save_adapters(full, path)
    barrier()


def save(gm: nn.Module, path: str | os.PathLike) -> None:
    """``lrc.save`` (base graph + weights + adapters) of a DDP- or FSDP2-wrapped graph; rank 0 writes."""
    full = full_copy(gm) if is_sharded(_unwrap(gm)) else _unwrap(gm)
    if rank() == 0:
        _formats.save(full, path)
    barrier()


def _unwrap(gm: nn.Module) -> nn.Module:
    gm = gm.module if isinstance(gm, nn.parallel.DistributedDataParallel) else gm
    return lrc_meta(gm).get("flat", gm) if isinstance(gm, fx.GraphModule) else gm
