"""Initialize data-dependent adapters (LoRA-GA, ...) from gradient statistics of a few batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx

from lowrank_compiler.errors import InitError
from lowrank_compiler.ir import META_KEY, AdapterMark, adapter_nodes, logical_weight, set_logical_weight
from lowrank_compiler.methods.base import DataDependentInit, by_method_class
from lowrank_compiler.methods.gradstats import GradStats
from lowrank_compiler.passes.manager import PassResult


class _Tap(torch.autograd.Function):
    """Identity on the site output whose backward hands (x, ∂L/∂y) to a stats accumulator.

    The extra ``anchor`` input (a scalar leaf that requires grad) keeps every site output in the
    autograd graph although no base weight requires grad, so backward computes exactly the
    activation gradients and no weight gradients.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor, sink: Callable) -> torch.Tensor:
        ctx.x, ctx.sink = x, sink
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        ctx.sink(ctx.x, grad)
        ctx.x = None
        return grad, None, None, None


def _call(gm: fx.GraphModule, batch: Any) -> Any:
    if isinstance(batch, dict):
        return gm(**batch)
    if isinstance(batch, (tuple, list)):
        return gm(*batch)
    return gm(batch)


def _allreduce(stats: list[GradStats]) -> None:
    import torch.distributed as dist

    if not _distributed():
        return
    avg = getattr(dist.ReduceOp, "AVG", None)
    backend_has_avg = dist.get_backend() not in ("gloo",)
    for s in stats:
        for t in s.tensors():
            if avg is not None and backend_has_avg:
                dist.all_reduce(t, op=avg)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(dist.get_world_size())


def initialize(
    gm: fx.GraphModule,
    data: Iterable[Any] | None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    batches: int | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> PassResult:
    """Run ``batches`` batches forward/backward in train mode and initialize every data-dependent adapter.

    Cases:
      1. a :class:`DataDependentInit` adapter that is not yet initialized: its ``init_stats()``
         accumulator gets (x, ∂L/∂y) for every batch; then ``initialize(stats, W)`` returns the new
         base weight, written as a new Parameter (``set_logical_weight``).
      2. its ``init_stats()`` is None (PiSSA, OLoRA: the init reads only W): no batch runs for it,
         ``initialize(None, W)`` directly; data and loss_fn are not needed when every site is so.
      3. only forward statistics (``needs_grad`` False, CorDA): the batches run in eval mode under
         no_grad and ``loss_fn`` is not needed.
    No uninitialized data-dependent adapter (e.g. a loaded model): nothing runs, ``modified=False``.

    Statistics are per-batch means over batches (each rank its own shard), all-reduced (AVG) under
    torch.distributed before the SVD, so every rank computes the same init. Dropout masks are drawn
    from ``seed`` (default: the first adapter's ``seed`` arg) without disturbing the caller's RNG.
    Base weights, adapter parameters and the caller's ``.grad`` buffers are untouched while estimating;
    adapters with ``identity_before_init`` (LoRA-GA: A = B = 0) run as the plain linear meanwhile.

    Raises:
        InitError: empty data, a loss that is not a scalar tensor, a non-finite loss or gradient
        (naming the site and batch).
    """
    sites: list[tuple[AdapterMark, Any]] = []
    for node in adapter_nodes(gm):
        mark: AdapterMark = node.meta[META_KEY]
        mod = gm.get_submodule(mark.module_path)
        if isinstance(mod, DataDependentInit) and mod.needs_init:
            sites.append((mark, mod))
    if not sites:
        return PassResult(gm, False)
    stats = [mod.init_stats(device=logical_weight(gm, mark).device) for mark, mod in sites]
    fed = [(site, s) for site, s in zip(sites, stats) if s is not None]  # the sites that need data
    if fed:
        _estimate(gm, fed, data, loss_fn, batches, progress, seed)
    with torch.no_grad():
        for (mark, mod), s in zip(sites, stats):
            new = mod.initialize(s, logical_weight(gm, mark))
            if new is not None:
                set_logical_weight(gm, mark, new)
        for cls, mods in by_method_class([mod for _, mod in sites]).items():
            cls.initialize_all(mods)
        _broadcast(gm, sites)
    return PassResult(gm, True)


def _estimate(gm: fx.GraphModule, fed: list[tuple[tuple[AdapterMark, Any], GradStats]], data: Iterable[Any] | None,
              loss_fn: Callable[[Any, Any], torch.Tensor] | None, batches: int | None, progress: bool,
              seed: int | None) -> None:
    """Feed every accumulator in ``fed`` from ``batches`` batches, then average (and all-reduce) them.

    With a statistic that ``needs_grad``: train mode, forward/backward of ``loss_fn``. Otherwise
    (forward-only statistics, e.g. CorDA's covariance): eval mode under no_grad, no ``loss_fn``.
    """
    sites = [site for site, _ in fed]
    stats = [s for _, s in fed]
    grad = any(s.needs_grad for s in stats)
    if data is None or (grad and loss_fn is None):
        missing = " and ".join(x for x, v in (("data", data), ("loss_fn", loss_fn if grad else 0)) if v is None)
        names = [m.site for m, _ in sites]
        raise InitError(
            f"sites {names[:3]}{'...' if len(names) > 3 else ''} use a data-dependent method; "
            f"pass {missing} to transform(): data=an iterable of batches (each called as gm(*batch) "
            "or gm(**batch)), loss_fn=lambda output, batch: scalar loss")
    if seed is None:
        seed = int(sites[0][1].config.get("seed", 0) or 0)
    device = logical_weight(gm, sites[0][0]).device
    adapter_params = [p for _, mod in sites for p in mod.parameters()]
    saved_rg = [p.requires_grad for p in adapter_params]
    saved_bypass = [mod.bypass for _, mod in sites]
    was_training = gm.training
    hooks = []
    anchor = torch.zeros((), device=device, requires_grad=True)

    def make_hook(s: GradStats) -> Callable:
        def hook(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if not s.needs_grad:
                s.update(args[0].detach(), None)
                return None
            return _Tap.apply(out, anchor, args[0].detach(), s.update)
        return hook

    n_batches = 0
    try:
        for p in adapter_params:
            p.requires_grad_(False)
        for _, mod in sites:  # an adapter that is the identity before init runs as the plain linear
            mod.bypass = mod.bypass or mod.identity_before_init
        hooks = [mod.register_forward_hook(make_hook(s)) for (_, mod), s in zip(sites, stats)]
        gm.train(grad)
        streamed = any(hasattr(s, "done") for s in stats)  # EVA: until converged, cycling the data (as PEFT)
        it = _cycle(data) if streamed else iter(data)
        if batches is not None or streamed:
            it = itertools.islice(it, batches if batches is not None else MAX_STREAMED_BATCHES)
        total = batches if batches is not None else (len(data) if hasattr(data, "__len__") and not streamed else None)
        bar = _progress(it, total, progress, sites[0][1].name, "gradients" if grad else "input statistics")
        with torch.random.fork_rng(devices=_cuda_devices(device)), torch.set_grad_enabled(grad):
            torch.manual_seed(seed)
            for n, batch in enumerate(bar):
                n_batches = n + 1
                rows = _token_rows(batch)
                for s in stats:
                    if hasattr(s, "row_mask"):
                        s.row_mask = rows
                out = _call(gm, batch)
                if grad:
                    _backward(loss_fn(out, batch), n)
                bad = torch.stack([s.nonfinite for s in stats])
                if bool(bad.any()):
                    site = sites[int(bad.nonzero()[0, 0])][0].site
                    raise InitError(f"non-finite {'gradient' if grad else 'input'} at site {site!r} in batch {n} "
                                    "(or NaN/inf in its input); check the data and loss_fn (or lower the loss scale)")
                if all(getattr(s, "done", False) for s in stats):
                    break  # every streamed statistic has converged (EVA)
    finally:
        for h in hooks:
            h.remove()
        for p, rg in zip(adapter_params, saved_rg):
            p.requires_grad_(rg)
        for (_, mod), bypass in zip(sites, saved_bypass):
            mod.bypass = bypass
        gm.train(was_training)
    if n_batches == 0:
        raise InitError("data yielded no batches; pass data= an iterable with at least one batch")
    unreached = [mark.site for (mark, _), s in zip(sites, stats) if s.updates == 0]
    if unreached:
        raise InitError(f"no {'gradient' if grad else 'input'} reached site(s) {unreached[:5]}"
                        f"{'...' if len(unreached) > 5 else ''}: the model output (loss_fn) does not depend on "
                        "them; exclude them from the spec (e.g. '!pooler.*') or use a loss computed from them")
    for s in stats:
        s.finish(n_batches)
    _allreduce(stats)


#: cap on the batches a converge-until-stable statistic (EVA) reads when ``init_batches`` is not given
MAX_STREAMED_BATCHES = 1000


def _cycle(data: Iterable[Any]) -> Iterable[Any]:
    """``data`` again and again (a one-shot iterator ends after its first pass)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return


def _token_rows(batch: Any) -> torch.Tensor | None:
    """The (batch, seq) rows that are real tokens: ``attention_mask`` and, when it has the same shape,
    ``labels != -100`` (PEFT's EVA default); None for batches that are not such dicts."""
    if not isinstance(batch, dict) or not isinstance(batch.get("attention_mask"), torch.Tensor):
        return None
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask


def _backward(loss: Any, n: int) -> None:
    """Check one batch's loss (a finite scalar that depends on the sites) and run backward."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InitError(f"loss_fn must return a scalar tensor, got "
                        f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))} at batch {n}")
    if not torch.isfinite(loss.detach()).all():
        raise InitError(f"the loss is non-finite ({loss.item()}) at batch {n}; "
                        "fix the data or loss_fn before a data-dependent init")
    if not loss.requires_grad:
        raise InitError("loss_fn's result does not depend on any adapted site; "
                        "the loss must be computed from the model output")
    loss.backward()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(gm: fx.GraphModule, sites: list[tuple[AdapterMark, Any]]) -> None:
    """Rank 0's adapter tensors and new base weights to every rank.

    The statistics are already identical after the all-reduce, but LAPACK/BLAS results may differ in
    the last bits between processes (memory alignment), so the init is made bitwise identical.
    """
    if not _distributed():
        return
    import torch.distributed as dist

    for mark, mod in sites:
        for t in list(mod.state_dict().values()) + [gm.get_parameter(mark.weight_path)]:
            dist.broadcast(t.data, src=0)


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _progress(it: Iterable[Any], total: int | None, enabled: bool, method: str, what: str) -> Iterable[Any]:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but don't fail an init over a progress bar
        return it
    return tqdm(it, total=total, desc=f"{method}: estimating {what}", unit="batch", leave=False)
