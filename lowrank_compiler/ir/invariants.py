"""verify(gm): the invariants of docs/INVARIANTS.md in code."""



from torch import fx, nn

from lowrank_compiler.ir.marks import META_KEY, NAMED_ROOT, AdapterMark, VerifyError, _aten, logical_weight, lrc_meta
from lowrank_compiler.ir.surgery import get_attr_tensor
from lowrank_compiler.methods.base import AdapterMethod


# -- invariants ------------------------------------------------------------------------------------
def verify(gm: fx.GraphModule) -> None:
    """Check the invariants of docs/INVARIANTS.md; raise :class:`VerifyError` naming the first broken one.

    1. the graph lints and its code is current; 2. every AdapterMark node calls an AdapterMethod
    and every AdapterMethod submodule is called by an AdapterMark node; 3. adapter nodes take
    ``(x, W, b)`` with W a d_out × d_in view of the marked weight parameter; 6. adapter nodes
    keep their ``meta['val']`` when the graph has them; 8. no ``aten.dropout`` node;
    9. outside adapters (and modules a spec made trainable), no parameter requires grad.
    """
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - re-raised as the invariant it breaks
        raise VerifyError(f"invariant 1 (lint-clean): {e}") from None
    if getattr(gm, "_code", None) is not None and gm.code != gm.graph.python_code("self").src:
        raise VerifyError("invariant 1 (recompiled): the graph changed after the last recompile()")
    called: set[str] = set()
    has_val = any("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    for node in gm.graph.nodes:
        mark = node.meta.get(META_KEY)
        if node.op == "call_function" and node.target is _aten.dropout.default:
            raise VerifyError(f"invariant 8 (mode): node {node.name} is a baked-in aten.dropout")
        if not isinstance(mark, AdapterMark):
            continue
        if node.op != "call_module":
            raise VerifyError(f"invariant 2 (marks): node {node.name} carries an AdapterMark but is {node.op}")
        try:
            mod = gm.get_submodule(node.target)
        except AttributeError:
            raise VerifyError(f"invariant 2 (marks): node {node.name} calls missing module {node.target}") from None
        if not isinstance(mod, AdapterMethod) or node.target != mark.module_path:
            raise VerifyError(f"invariant 2 (marks): node {node.name} ({mark.site}) does not call an AdapterMethod "
                              f"at {mark.module_path}")
        called.add(node.target)
        _verify_weight_arg(gm, node, mark)
        if has_val and "val" not in node.meta:
            raise VerifyError(f"invariant 6 (meta): adapter node {node.name} ({mark.site}) lost meta['val']")
    # adapters held by a called module (the members of a mixed-batch adapter) or stored inactive count as owned
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # ... and so does an adapter that a called module holds under another path too (a lowering's kernel module)
    held = {id(m) for t in targets if t not in called for m in gm.get_submodule(t).modules()}
    owned = [name for name, mod in gm.named_modules() if isinstance(mod, AdapterMethod) and name not in called
             and (name.startswith(NAMED_ROOT + ".") or any(name.startswith(t + ".") for t in targets)
                  or id(mod) in held)]
    for name, mod in gm.named_modules():
        if isinstance(mod, AdapterMethod) and name not in called and name not in owned:
            raise VerifyError(f"invariant 2 (marks): adapter module {name} is not called by any marked node")
    if called or owned:
        keep = {id(p) for name in [*called, *owned] for p in gm.get_submodule(name).parameters()}
        keep |= {id(p) for p in lrc_meta(gm).get("trainable_extra", ())}
        loose = [n for n, p in gm.named_parameters() if p.requires_grad and id(p) not in keep]
        if loose:
            raise VerifyError(f"invariant 9 (frozen base): base parameters require grad: {loose[:3]}")


def _verify_weight_arg(gm: fx.GraphModule, node: fx.Node, mark: AdapterMark) -> None:
    if len(node.args) != 3:
        raise VerifyError(f"invariant 3 (weight in): adapter node {node.name} takes {len(node.args)} args, not (x, W, b)")
    w = node.args[1]
    if mark.layout == "conv1d" and isinstance(w, fx.Node) and w.op == "call_function" and w.target is _aten.t.default:
        w = w.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target == mark.weight_path):
        raise VerifyError(f"invariant 3 (weight in): adapter node {node.name} ({mark.site}) does not receive "
                          f"its base weight {mark.weight_path} as W")
    if not isinstance(get_attr_tensor(gm, w), nn.Parameter):
        raise VerifyError(f"invariant 3 (weight in): {mark.weight_path} is not a parameter of the graph")
    mod = gm.get_submodule(mark.module_path)
    shape = tuple(logical_weight(gm, mark).shape)
    if shape != (mod.d_out, mod.d_in):
        raise VerifyError(f"invariant 3 (weight in): {mark.site}: W is {shape}, adapter expects "
                          f"({mod.d_out}, {mod.d_in})")
