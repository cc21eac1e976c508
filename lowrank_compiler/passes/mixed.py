"""Mixed: one graph serves a batch whose rows use different adapters, chosen by an ``adapter_ids`` input."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_structure, tree_unflatten

from lowrank_compiler.errors import LrcError
from lowrank_compiler.ir import (
    META_KEY,
    AdapterMark,
    adapter_nodes,
    finalize,
    logical_weight,
    lrc_meta,
    set_logical_weight,
)
from lowrank_compiler.methods.base import AdapterMethod, MixedFactors
from lowrank_compiler.passes.manager import PassResult

IDS = "adapter_ids"
MIXED_KEY = "lrc_mixed"


@dataclass(frozen=True)
class MixedMark:
    """On every mixed-adapter call ``rows(x, W, b, adapter_ids)``: the site and where its tensors live."""

    site: str
    layout: str
    weight_path: str
    module_path: str


class MixedAdapter(nn.Module):
    """One site's K adapters applied per row: row i uses slot ``adapter_ids[i]`` (−1: the base linear).

    Additive members (``mixed_factors``) are stacked into ``A`` [K+1, d_in, r], ``B`` [K+1, r, d_out] and
    ``gain`` [K+1, d_out] (ranks zero-padded to ``rank``, slot K+1 = base: zeros, gain 1), then one gather
    and two batched matmuls give every row its own update: ``y = g ⊙ (W x + (x A_i) B_i) + b``. With grad
    enabled the stacks are built from the members' parameters on each call (training: each adapter gets
    exactly the gradient of its own rows); without grad they are read from buffers of fixed ``capacity``
    (refreshed in eager mode when a member changed), so adding an adapter or changing one never changes a
    shape and ``torch.compile`` / ONNX keep one graph. A natively batched method (FLoRA) is the only
    member and routes the ids itself (``forward_rows``).
    """

    def __init__(self, members: list[AdapterMethod], capacity: int, rank: int,
                 offset: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        first = members[0]
        self.d_in, self.d_out, self.site_name = first.d_in, first.d_out, first.site_name
        self.members = nn.ModuleList(members)
        self.native = bool(first.batched)
        self.capacity, self.rank = capacity, rank
        dtype, dev = _dtype_device(first)
        r_off = 0 if offset is None else offset[0].shape[0]
        if offset is not None:  # a known base offset (LoRA-GA): every slot adds it back, the base slot does not
            self.register_buffer("offset_A", offset[0].to(dtype), persistent=False)
            self.register_buffer("offset_B", offset[1].to(dtype), persistent=False)
        self.has_offset = offset is not None
        n = 0 if self.native else capacity + 1
        # MatMul layout (as ONNX LoRA inputs): A [n, d_in, r], B [n, r, d_out], so Δy = (x @ A_i) @ B_i
        self.register_buffer("A", torch.zeros(n, self.d_in, rank + r_off, dtype=dtype, device=dev), persistent=False)
        self.register_buffer("B", torch.zeros(n, rank + r_off, self.d_out, dtype=dtype, device=dev), persistent=False)
        self.register_buffer("gain", torch.ones(n, self.d_out, dtype=dtype, device=dev), persistent=False)
        self.has_gain = False
        self._key: tuple | None = None
        self.hold = False  # True: use the buffers as they are (an exporter swapped in placeholders)

    # -- stacks ------------------------------------------------------------------------------------
    def _factors(self, weight: torch.Tensor) -> list[MixedFactors]:
        if self.has_offset:  # the members were built on the moved base W0 − s·B0 A0
            weight = weight + self.offset_B @ self.offset_A
        out = []
        for m in self.members:
            f = m.mixed_factors(weight)
            if m.bypass:  # disabled: contributes nothing
                f = MixedFactors(torch.zeros_like(f.A), torch.zeros_like(f.B), None, 0.0)
            out.append(f)
        return out

    def _stack(self, fs: list[MixedFactors], slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A, B, gain)`` stacks with ``slots`` adapter slots + the base slot (padded with zeros / ones)."""
        def pad_a(a: torch.Tensor) -> torch.Tensor:  # r × d_in → d_in × rank(+offset)
            a = F.pad(a, (0, 0, 0, self.rank - a.shape[0]))
            return (torch.cat([a, self.offset_A], 0) if self.has_offset else a).t()

        def pad_b(b: torch.Tensor) -> torch.Tensor:  # d_out × r → rank(+offset) × d_out
            b = F.pad(b, (0, self.rank - b.shape[1]))
            return (torch.cat([b, self.offset_B], 1) if self.has_offset else b).t()

        za, zb = torch.zeros_like(self.A[0]), torch.zeros_like(self.B[0])
        extra = slots - len(fs)
        a = torch.stack([pad_a(f.A) for f in fs] + [za] * (extra + 1))
        b = torch.stack([pad_b(f.B) for f in fs] + [zb] * (extra + 1))
        gain = None
        if any(f.gain is not None for f in fs):
            one = torch.ones_like(self.gain[0])
            gain = torch.stack([one if f.gain is None else f.gain for f in fs] + [one] * (extra + 1))
        return a, b, gain

    def _version_key(self, weight: torch.Tensor) -> tuple:
        """Changes whenever a member, its tensors' values or the base weight change (cheap: no kernels)."""
        ids = tuple(id(m) for m in self.members)
        if getattr(self, "_watch", (None,))[0] != ids:
            self._watch = (ids, [t for m in self.members for t in (*m.parameters(), *m.buffers())])
        ts = self._watch[1]
        return (ids, id(weight), weight._version, *(m.bypass for m in self.members),
                *(id(t) for t in ts), *(t._version for t in ts))

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Write the members' current factors into the capacity buffers (no shape changes)."""
        if self.native:
            return
        if len(self.members) > self.capacity:
            raise LrcError(f"{self.site_name}: {len(self.members)} adapters exceed the mixed graph's capacity "
                           f"{self.capacity}; build it with a larger capacity=")
        fs = self._factors(weight)
        too_big = [f.A.shape[0] for f in fs if f.A.shape[0] > self.rank]
        if too_big:
            raise LrcError(f"{self.site_name}: adapter rank {max(too_big)} exceeds the mixed graph's rank "
                           f"{self.rank}; build it with rank>={max(too_big)}")
        a, b, gain = self._stack(fs, self.capacity)
        self.A.copy_(a)
        self.B.copy_(b)
        self.has_gain = gain is not None
        self.gain.copy_(gain if gain is not None else torch.ones_like(self.gain))
        self._key = self._version_key(weight)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                adapter_ids: torch.Tensor | None) -> torch.Tensor:
        if adapter_ids is None:
            raise LrcError(f"this graph serves mixed-adapter batches: pass {IDS}= (one int per row, −1 = base)")
        compiling = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if not compiling and not adapter_ids.is_cuda:
            self._check_ids(adapter_ids)
        if self.native:
            return self.members[0].forward_rows(x, weight, bias, adapter_ids)
        if torch.is_grad_enabled():
            fs = self._factors(weight)
            a, b, gain = self._stack(fs, len(fs))
            p = [f.dropout for f in fs] if self.training else None
        else:
            if not compiling and not self.hold and self._key != self._version_key(weight):
                self.refresh(weight)
            a, b, gain, p = self.A, self.B, (self.gain if self.has_gain else None), None
        return rows(x, weight, bias, adapter_ids, a, b, gain, p)

    def _check_ids(self, adapter_ids: torch.Tensor) -> None:
        n = self.members[0].n_slots if self.native else len(self.members)
        if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= n):
            raise LrcError(f"{IDS} must be in [-1, {n}) (−1 = base model, k = adapter slot k of {n}); got "
                           f"values in [{int(adapter_ids.min())}, {int(adapter_ids.max())}]")


def rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
         a: torch.Tensor, b: torch.Tensor, gain: torch.Tensor | None, dropout: list[float] | None) -> torch.Tensor:
    """``y_i = g_i ⊙ (W x_i + (x_i A_k) B_k) + b`` for every row i, k = ``ids[i]`` (−1: the last, base, slot)."""
    n = ids.shape[0]
    d_in = x.shape[-1]
    x3 = x.reshape(n, -1, d_in).to(a.dtype)
    idx = torch.where(ids < 0, a.shape[0] - 1, ids)
    ai, bi = a.index_select(0, idx), b.index_select(0, idx)  # gather: [N, d_in, r], [N, r, d_out]
    xd = x3
    if dropout is not None and any(p > 0 for p in dropout):
        keep = 1.0 - torch.tensor(dropout + [0.0] * (a.shape[0] - len(dropout)), dtype=x3.dtype,
                                  device=x3.device)[idx].view(n, 1, 1)
        xd = x3 * (torch.rand_like(x3) < keep) / keep
    h = torch.bmm(xd, ai)
    w = weight.to(a.dtype)
    if gain is None:  # one batched GEMM adds B_i h into W x + b
        out = F.linear(x3, w, None if bias is None else bias.to(w.dtype))
        return torch.baddbmm(out, h, bi).reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
    g = gain[idx].unsqueeze(1)
    if xd is x3:
        y = g * torch.baddbmm(F.linear(x3, w), h, bi)
    else:
        y = F.linear(x3, w) + (g - 1) * F.linear(xd, w) + g * torch.bmm(h, bi)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _dtype_device(m: nn.Module) -> tuple[torch.dtype, torch.device]:
    t = next(iter(m.parameters()), None)
    if t is None:
        t = next(iter(m.buffers()))
    return t.dtype, t.device


def add_ids_input(gm: fx.GraphModule) -> fx.Node:
    """Append the ``adapter_ids`` placeholder (keeping a pytree-codegen signature consistent)."""
    g = gm.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    has_default = bool(phs) and len(phs[-1].args) > 0  # after a defaulted parameter, ours needs one too
    with g.inserting_after(phs[-1]) if phs else g.inserting_before(next(iter(g.nodes))):
        ids = g.placeholder(IDS, default_value=None if has_default else inspect.Signature.empty)
    cg = g._codegen
    info = getattr(cg, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        args, kwargs = tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
        if kwargs:
            spec = tree_structure((tuple(args), {**kwargs, IDS: 0}))
        else:
            spec = tree_structure(((*args, 0), kwargs))
        cg.pytree_info = info._replace(orig_args=[*info.orig_args, IDS], in_spec=spec)
    return ids


def mixed(gm: fx.GraphModule, members: dict[str, list[AdapterMethod]], capacity: int, rank: int) -> PassResult:
    """A new graph over the same parameters where each adapter call takes the per-row ``adapter_ids``.

    Cases:
      1. adapter node ``adapter(x, W, b)`` → ``<site>.adapter_rows(x, W, b, adapter_ids)`` (a
         :class:`MixedAdapter` holding ``members[site]``, slot k = ``members[site][k]``).
      2. a site whose members share a known base offset (LoRA-GA: W = W0 − s·B0 A0) runs on W0 in the new
         graph (its own parameter), every slot adding the offset back, so −1 rows see the original base.
    ``gm`` is not changed. A graph without adapters gets the input but no rewrite (``modified=False``).

    Raises:
        LrcError: a member cannot be stacked (no ``mixed_factors``, or it changes the base in an unknown
        way), a merged member, or a batched method (FLoRA) mixed with other adapters.
    """
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph)
    out.meta.update(copy.copy(gm.meta))
    out.meta[META_KEY] = dict(lrc_meta(gm))
    ids = add_ids_input(out)
    nodes = adapter_nodes(out)
    for node in nodes:
        _try_rewrite(out, gm, node, ids, members[node.meta[META_KEY].site], capacity, rank)
    out.train(gm.training)
    return PassResult(finalize(out), bool(nodes))


def _try_rewrite(gm: fx.GraphModule, source: fx.GraphModule, node: fx.Node, ids: fx.Node,
                 mods: list[AdapterMethod], capacity: int, rank: int) -> bool:
    mark: AdapterMark = node.meta[META_KEY]
    problems = [f"{m.name}: merged; unmerge_adapters first" for m in mods if m.merged]
    if any(m.batched for m in mods) and len(mods) > 1:
        problems.append(f"{mods[0].name} holds its own adapters per row and cannot be mixed with others")
    w = logical_weight(gm, mark)
    for m in mods:
        if not m.batched and m.mixed_factors(w) is None:
            problems.append(f"{m.name} has no additive low-rank form to stack")
        elif m.modifies_base and m.base_offset() is None:
            problems.append(f"{m.name} changes the base weight in a way other adapters cannot share")
    offsets = [o for o in (m.base_offset() for m in mods) if o is not None]
    if len(offsets) > 1:
        problems.append("more than one adapter moved the base weight")
    if problems:
        raise LrcError(f"site {mark.site!r} cannot serve mixed batches: " + "; ".join(problems))
    offset = None
    if offsets:
        o = offsets[0]
        with torch.no_grad():
            a0, b0 = o.A.detach().float(), o.B.detach().float() * o.scale
            set_logical_weight(gm, mark, w.float() + b0 @ a0)  # the original base, in this graph only
            offset = (a0, -b0)
    path = mark.module_path + "_rows"
    mod = MixedAdapter(mods, capacity, rank, offset)
    gm.add_submodule(path, mod)
    x, wn, b = node.args
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, (x, wn, b, ids))
    new.meta.update({k: v for k, v in node.meta.items() if k != META_KEY})
    new.meta[MIXED_KEY] = MixedMark(mark.site, mark.layout, mark.weight_path, path)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    parent, _, leaf = mark.module_path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if owner is not (source.get_submodule(parent) if parent else source):  # never edit the source's modules
        delattr(owner, leaf)  # the members hold it now
    with torch.no_grad():
        mod.refresh(logical_weight(gm, mark))
    return True


def mixed_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, MixedMark, MixedAdapter]]:
    """``(node, mark, MixedAdapter)`` for every mixed-adapter call, in graph order."""
    out = []
    for n in gm.graph.nodes:
        mark = n.meta.get(MIXED_KEY)
        if n.op == "call_module" and isinstance(mark, MixedMark):
            out.append((n, mark, gm.get_submodule(mark.module_path)))
    return out
