"""SmoothQuant-style outlier migration on an fp32 ONNX graph, before int8 quantization.

Dynamic int8 quantizes each MatMul's activation per tensor at run time, so one outlier channel (MiniLM:
a LayerNorm output channel at ~30 against a median of ~1.6, a GELU output channel at ~23 against ~1)
sets the step for all the others. SmoothQuant (Xiao et al. 2023) divides activation channel j by
``s_j = amax(X_j)^alpha / amax(W_j,:)^(1-alpha)`` and multiplies weight row j by ``s_j``: ``(X/s)(sW) = XW``
exactly, and the outlier moves into the weights, which are quantized per output channel.

Here every group of weight MatMuls that read one activation tensor (q/k/v read one LayerNorm output)
shares one ``s``; activation maxima come from ORT runs of the fp32 model on sample inputs. A fixed alpha
fails on MiniLM (the GELU outlier channel's weight row is an outlier too), so alpha is chosen per group by
simulating ORT's int8 arithmetic on the sample rows, and up to 4 outlier channels per group can leave the
int8 product for a small fp32 MatMul (LLM.int8()-style) where that halves the simulated error.
The division is folded where that is exact and free:

- into a LayerNormalization's scale and bias when the group are its only readers (pre-LN decoders);
- into the producing weight MatMul's output columns (and its bias ``Add``), through shape-preserving ops
  on the channel axis: attention-out's input ``softmax(QK)·V`` is linear in V's columns, so V's weight
  columns and bias take ``1/s`` (the Reshape/Transpose between keep channel c = head·d + i);

otherwise (a LayerNorm that also feeds the residual, a GELU output) one ``Mul`` by ``1/s`` is inserted in
front of the group; other readers (the residual, a LoRA branch) keep reading the unscaled tensor.
The transformed model equals the original in fp32 up to rounding (tests check it).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            out[i].append(n)
    return out


def activations(model: Any, tensors: list[str], samples: list[dict[str, np.ndarray]],
                max_rows: int = 1024) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """{tensor: (per-channel max |x| over every sample row, per sample its rows (tokens) as [rows,
    channels], evenly spaced, ``max_rows`` in all)}: the fp32 model run on ``samples`` with the tensors
    as outputs. Rows stay per sample: ORT picks the int8 range per run, and the gate is per sample."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # keep the named tensors
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    for feeds in samples:
        for t, v in zip(tensors, sess.run(tensors, feeds)):
            rows[t].append(np.asarray(v, np.float32).reshape(-1, v.shape[-1]))
    per = max(max_rows // max(len(samples), 1), 64)
    return {t: (np.max([np.abs(x).max(0) for x in r], axis=0),
                [x[np.linspace(0, len(x) - 1, per).astype(int)] if len(x) > per else x for x in r])
            for t, r in rows.items()}


def _qdq_act(x: np.ndarray) -> np.ndarray:
    """ORT DynamicQuantizeLinear round trip: per-tensor asymmetric uint8 over [min(x, 0), max(x, 0)]."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    sc = (hi - lo) / 255 or 1.0
    zp = np.clip(np.round(-lo / sc), 0, 255)
    return (np.clip(np.round(x / sc) + zp, 0, 255) - zp) * sc


def _qdq_weight(w: np.ndarray) -> np.ndarray:
    """Per-output-column symmetric int8 round trip (ORT's per-channel MatMul weights)."""
    sc = np.abs(w).max(0) / 127
    sc[sc == 0] = 1.0
    return np.clip(np.round(w / sc), -127, 127) * sc


def simulated_error(x: np.ndarray, ws: list[np.ndarray], s: np.ndarray | None,
                    out: np.ndarray | None = None, ys: list[np.ndarray] | None = None) -> float:
    """Sum over the group of ||int8(x/s)·int8(s·W) − x·W||² / ||x·W||²: the relative error the int8 MatMuls
    would make on these rows with smoothing scales ``s`` (None: no smoothing); channels ``out`` (indices)
    are taken out of the int8 product and computed in fp32. ``ys``: the x·W, if already computed."""
    keep = np.ones(x.shape[1], np.float32)
    if out is not None and len(out):
        keep[out] = 0.0
    m = keep if s is None else keep / s
    xq = _qdq_act(x * m)
    err = 0.0
    for i, w in enumerate(ws):
        y = x @ w if ys is None else ys[i]
        yq = xq @ _qdq_weight(w * (keep if s is None else s * keep)[:, None])
        if out is not None and len(out):
            yq += x[:, out] @ w[out]
        err += float(np.square(yq - y).sum() / max(float(np.square(y).sum()), 1e-30))
    return err


AMAX_FLOOR = 0.5  # quantile of the channel maxima below which a channel's observed max is not trusted


def smooth_scales(amax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = amax_j^alpha / max_k |W_jk|^(1-alpha)`` over the group's weights ([in, out] each), in float32.

    ``amax_j`` is floored at the ``AMAX_FLOOR`` quantile of all channels' maxima: a channel quiet on the
    samples (a GELU unit never positive there) would otherwise get a tiny ``s_j``, and on new inputs
    where it fires, ``x_j / s_j`` would blow up the per-tensor int8 range of every other channel."""
    wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
    a = np.maximum(amax.astype(np.float64), max(float(np.quantile(amax, AMAX_FLOOR)), 1e-5))
    s = a ** alpha / np.maximum(wmax.astype(np.float64), 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
OUTLIER_COUNTS = (0, 1, 2, 4)
OUTLIER_GAIN = 2.0  # take channels out of the int8 product only if that halves its simulated error
OUTLIER_PREFIX = "lrc_outlier_"


def _choose(amax: np.ndarray, blocks: list[np.ndarray], ws: list[np.ndarray], alpha: float | None,
            outliers: float) -> tuple[float | None, np.ndarray, float]:
    """(alpha, outlier channel indices, simulated error): the smoothing with the smallest simulated int8
    error -- the worst over the samples' row ``blocks``, as the gate takes the worst sample -- and outlier
    channels only when they cut that error by the factor ``outliers`` (0: never). ``amax``: the channel
    maxima over all sample rows. (Cross-validating the choice over halves of the rows was tried: no
    better on held-out inputs, twice the cost.)"""
    wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)
    order = np.argsort(amax * wmax)[::-1]
    alphas = [None, *ALPHAS] if alpha is None else [alpha]
    ys = [[x @ w for w in ws] for x in blocks]

    def err(a: float | None, out: np.ndarray) -> float:
        s = None if a is None else smooth_scales(amax, ws, a)
        return max(simulated_error(x, ws, s, out, y) for x, y in zip(blocks, ys))

    best: tuple[float, float | None, np.ndarray] | None = None
    for k in OUTLIER_COUNTS if outliers else (0,):
        out = np.sort(order[:k])
        e, a = min(((err(a, out), a) for a in alphas), key=lambda t: t[0])
        if best is None or e * outliers <= best[0]:
            best = (e, a, out)
    assert best is not None
    return best[1], best[2], best[0]


def smooth(model: Any, names: list[str], samples: list[dict[str, np.ndarray]],
           alpha: float | None = None, outliers: float = OUTLIER_GAIN) -> dict[str, dict[str, Any]]:
    """Migrate activation outliers of the MatMuls ``names`` (constant weight at input 1) into their
    weights, in place on ``model``. ``alpha``: the migration strength, or None to pick per group the
    one of ``ALPHAS`` (or none) whose simulated int8 error on the sample rows is smallest.
    ``outliers``: take up to 4 outlier channels out of the int8 product into a small fp32 MatMul
    (LLM.int8()-style decomposition; named ``lrc_outlier_*``, never quantized) where that divides the
    simulated error by at least this factor (0: never). Groups are processed last to first, so a fold
    into an earlier producer's weights happens before that producer's own group is smoothed.
    Returns {input tensor: {alpha, outliers (channel list), how ("layernorm", "producer", "mul", or
    "none": left as is), error (simulated relative int8 error per MatMul), nodes (the group)}}."""
    from onnx import numpy_helper

    g = model.graph
    nodes = {n.name: n for n in g.node}
    by_input: dict[str, list[Any]] = defaultdict(list)
    for name in names:
        by_input[nodes[name].input[0]].append(nodes[name])
    if not by_input:
        return {}
    inits = {i.name: i for i in g.initializer}
    acts = activations(model, sorted(by_input), samples)
    done: dict[str, dict[str, Any]] = {}
    order = {n.name: i for i, n in enumerate(g.node)}
    for x, group in sorted(by_input.items(), key=lambda kv: -min(order[n.name] for n in kv[1])):
        cons = _consumers(g)
        producer = {o: n for n in g.node for o in n.output}
        ws = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in group]
        amax, rows = acts[x]
        if any(w.ndim != 2 or w.shape[0] != amax.shape[0] for w in ws):
            continue  # not an [in, out] weight over x's channels
        a, out, e = _choose(amax, rows, ws, alpha, outliers)
        if a is None and not len(out):
            done[x] = {"alpha": None, "outliers": [], "how": "none", "error": e / len(group),
                       "nodes": [n.name for n in group]}
            continue
        s = np.ones(ws[0].shape[0], np.float32) if a is None else smooth_scales(amax, ws, a)
        keep = np.ones_like(s)
        keep[out] = 0.0
        for n, w in zip(group, ws):
            _set_init(g, inits, n, 1, (w * (s * keep)[:, None]).astype(np.float32), cons)
        only_group = {id(r) for r in cons[x]} == {id(n) for n in group}
        if len(out):
            _decompose(g, x, group, ws, out, keep / s, cons, inits)
            how = "mul"
        elif only_group and _fold_layernorm(g, inits, producer.get(x), s, cons):
            how = "layernorm"
        elif only_group and _fold_producer(g, inits, producer, cons, x, s):
            how = "producer"
        else:
            _insert_mul(g, x, group, 1.0 / s)
            how = "mul"
        done[x] = {"alpha": a, "outliers": [int(i) for i in out], "how": how, "error": e / len(group),
                   "nodes": [n.name for n in group]}
    return done


def _set_init(g: Any, inits: dict[str, Any], node: Any, idx: int, value: np.ndarray, cons: dict[str, list]) -> None:
    """Give ``node.input[idx]`` the constant ``value``: in place if only ``node`` reads it, else a new initializer."""
    from onnx import numpy_helper

    name = node.input[idx]
    if len(cons[name]) == 1 and name not in {i.name for i in g.input}:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
        return
    new = f"{name}_lrc_smooth_{node.name}"
    g.initializer.append(numpy_helper.from_array(value, new))
    inits[new] = g.initializer[-1]
    node.input[idx] = new
    cons[name].remove(node)
    cons[new].append(node)


def _fold_layernorm(g: Any, inits: dict[str, Any], ln: Any, s: np.ndarray, cons: dict[str, list]) -> bool:
    """LayerNormalization(x, gamma, beta) read only by the group: gamma, beta /= s."""
    from onnx import numpy_helper

    if ln is None or ln.op_type != "LayerNormalization" or len(ln.output) > 1 and any(cons[o] for o in ln.output[1:]):
        return False
    if len(ln.input) < 2:
        return False
    if any(i not in inits for i in ln.input[1:3]):
        return False
    for idx in range(1, len(ln.input[:3])):
        v = numpy_helper.to_array(inits[ln.input[idx]])
        if v.shape != s.shape:
            return False
    for idx in range(1, len(ln.input[:3])):
        v = numpy_helper.to_array(inits[ln.input[idx]])
        _set_init(g, inits, ln, idx, (v / s).astype(v.dtype), cons)
    return True


_CHANNEL_OPS = ("Reshape", "Transpose")


def _fold_producer(g: Any, inits: dict[str, Any], producer: dict, cons: dict[str, list], x: str,
                   s: np.ndarray) -> bool:
    """x = Reshape(Transpose(MatMul(P, V))) with V = Transpose(Reshape(Add(MatMul(h, Wv), bv))) -- the
    attention context -- or x = Add(MatMul(h, W), b) directly: divide W's columns and b by s.

    Only when every tensor on the way has a single reader (so nothing else sees the scaled values) and
    the chain is the head split and merge of one [batch, seq, heads, dim] layout, which dynamo exports for
    every HF attention (:func:`_channels_preserved`). ``quantize_onnx`` runs the result against the
    original, so a layout this check lets through by mistake is refused, not shipped."""
    path, t = [], x
    while True:
        n = producer.get(t)
        if n is None or (t != x and len(cons[t]) != 1):
            return False
        path.append(n)
        if n.op_type in _CHANNEL_OPS:
            t = n.input[0]
        elif n.op_type == "MatMul" and n.input[1] not in inits:  # P·V: linear in V's last axis
            t = n.input[1]
        elif n.op_type == "Add":
            break
        else:
            return False
    add = path[-1]
    bias_idx = next((i for i in (0, 1) if add.input[i] in inits), None)
    if bias_idx is None:
        return False
    mm = producer.get(add.input[1 - bias_idx])
    if mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits or len(cons[mm.output[0]]) != 1:
        return False
    if not _channels_preserved(path[:-1]):
        return False
    from onnx import numpy_helper

    w, b = numpy_helper.to_array(inits[mm.input[1]]), numpy_helper.to_array(inits[add.input[bias_idx]])
    if w.ndim != 2 or w.shape[1] != s.shape[0] or b.shape != s.shape:
        return False
    _set_init(g, inits, mm, 1, (w / s[None, :]).astype(w.dtype), cons)
    _set_init(g, inits, add, bias_idx, (b / s).astype(b.dtype), cons)
    return True


def _channels_preserved(path: list[Any]) -> bool:
    """The Reshape/Transpose/MatMul chain from x back to the Add: a head split ``[B,S,C]->[B,S,H,D]->
    [B,H,S,D]``, an attention MatMul (last axis kept), and the merge ``[B,H,S,D]->[B,S,H,D]->[B,S,C]``.
    Checked structurally (op sequence, both Transposes ``perm=[0, 2, 1, 3]``); the MatMul keeps V's last axis."""
    ops = [n.op_type for n in path]
    if not ops:
        return True
    if ops != ["Reshape", "Transpose", "MatMul", "Transpose", "Reshape"]:
        return False
    for n in (path[1], path[3]):
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if perm != [0, 2, 1, 3]:
            return False
    return True


def _insert_mul(g: Any, x: str, group: list, m: np.ndarray) -> None:
    """``x_s = x * m`` in front of the group's MatMuls (after x's producer, so the order stays topological)."""
    from onnx import helper, numpy_helper

    g.initializer.append(numpy_helper.from_array(m.astype(np.float32), f"{x}_lrc_smooth_scale"))
    mul = helper.make_node("Mul", [x, f"{x}_lrc_smooth_scale"], [f"{x}_lrc_smoothed"], name=f"lrc_smooth_{x}")
    g.node.insert(min(list(g.node).index(n) for n in group), mul)
    for n in group:
        n.input[0] = f"{x}_lrc_smoothed"


def _decompose(g: Any, x: str, group: list, ws: list[np.ndarray], out: np.ndarray, m: np.ndarray,
               cons: dict[str, list], inits: dict[str, Any]) -> None:
    """int8 part: ``(x * m) · W'`` (m zero on the ``out`` channels); fp32 part: ``x[..., out] · W[out]``,
    added after the MatMul's bias ``Add`` when it has one (so ORT still fuses the bias into the int8 op)."""
    from onnx import helper, numpy_helper

    _insert_mul(g, x, group, m)
    idx, xo = f"{x}_lrc_outlier_idx", f"{x}_lrc_outliers"
    g.initializer.append(numpy_helper.from_array(out.astype(np.int64), idx))
    pos = min(list(g.node).index(n) for n in group)
    g.node.insert(pos, helper.make_node("Gather", [x, idx], [xo], name=f"lrc_gather_{x}", axis=-1))
    for n, w in zip(group, ws):
        after = n
        readers = cons[n.output[0]]
        if len(readers) == 1 and readers[0].op_type == "Add" and any(i in inits for i in readers[0].input):
            after = readers[0]  # the bias Add
        y, part, w_o = after.output[0], f"{after.output[0]}_lrc_int8_part", f"{n.name}_lrc_outlier_w"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[out]), w_o))
        after.output[0] = part
        at = list(g.node).index(after) + 1
        g.node.insert(at, helper.make_node("MatMul", [xo, w_o], [f"{y}_lrc_outlier"], name=f"{OUTLIER_PREFIX}{n.name}"))
        g.node.insert(at + 1, helper.make_node("Add", [part, f"{y}_lrc_outlier"], [y], name=f"lrc_add_outlier_{n.name}"))
