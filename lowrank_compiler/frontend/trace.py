"""model -> GraphModule: ``fx.symbolic_trace`` where it works, else ``torch.export`` (non-strict); then attach the face."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from lowrank_compiler.errors import TraceError
from lowrank_compiler.frontend.capture import default_inputs, export_model, model_record
from lowrank_compiler.frontend.module import attach
from lowrank_compiler.ir import lrc_meta


def trace(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    strategy: str = "auto",
    trace_cache: bool | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into an :class:`~lowrank_compiler.frontend.module.LrcGraphModule` whose dropout follows train()/eval().

    Without example inputs, an HF model (one with a ``config``) is traced on ``input_ids`` [2, 16]
    (+ ``attention_mask``); every other call the model accepts is traced on first use (face.py).

    ``strategy``: ``"auto"`` tries ``fx.symbolic_trace`` then ``torch.export``; ``"fx"`` or
    ``"export"`` forces one. For export, tensor inputs get dynamic batch (dim 0) and sequence
    (dim 1) sizes; non-tensor kwargs (``use_cache=False``) are baked into the graph.

    ``trace_cache``: use the trace cache (:mod:`.trace_cache`) for this trace and every later call
    signature's (``None``: unless ``$LRC_TRACE_CACHE`` is 0); ``False`` always traces.

    Raises:
        TraceError: every strategy failed; the message names each failure.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if strategy not in ("auto", "fx", "export"):
        raise TraceError(f"strategy must be 'auto', 'fx' or 'export', got {strategy!r}")
    if isinstance(model, fx.GraphModule) and "lrc" in model.meta:
        return model
    if example_inputs is None and example_kwargs is None:
        example_inputs, example_kwargs = default_inputs(model) or ((), {})
    example_inputs = tuple(example_inputs or ())
    example_kwargs = dict(example_kwargs or {})
    failures: list[str] = []
    was_training = model.training
    if strategy in ("auto", "fx"):
        try:
            gm = fx.symbolic_trace(model)
            lrc_meta(gm).update(trace="fx", example_inputs=example_inputs, example_kwargs=example_kwargs,
                                input_names=[n.target for n in gm.graph.nodes if n.op == "placeholder"],
                                trace_cache=trace_cache, **model_record(model))
            gm.train(was_training)
            return attach(gm, model)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"fx.symbolic_trace: {type(e).__name__}: {_first_line(e)}")
    if strategy in ("auto", "export"):
        if not example_inputs and not example_kwargs:
            failures.append("torch.export: needs example inputs; pass example_inputs=(input_ids,) "
                            "and/or example_kwargs={...}")
        else:
            try:
                gm = export_model(model, example_inputs, example_kwargs, was_training, cache=trace_cache)
                lrc_meta(gm)["trace_cache"] = trace_cache
                return attach(gm, model)
            except Exception as e:  # noqa: BLE001
                failures.append(f"torch.export (non-strict): {type(e).__name__}: {_first_line(e)}")
            finally:
                model.train(was_training)
    raise TraceError(f"could not trace {type(model).__name__}:\n  - " + "\n  - ".join(failures))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
