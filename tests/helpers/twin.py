"""The fp32 twin of a bf16 / fp16 model: what a bf16 decoder's ONNX export traced before issue 22 cut its
memory (an fp32 copy of every weight). Tests export it as the reference the streamed fp32 export must equal."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.formats.model import adapter_records
from lowrank_compiler.frontend.trace import trace
from lowrank_compiler.ir import META_KEY, adapter_nodes, adapters_of, logical_weight, lrc_meta, set_logical_weight
from lowrank_compiler.passes.pipelines import apply_records


def fp32_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """An fp32 copy of ``gm`` (a bf16 / fp16 HF causal LM with a face): the model's tensors upcast (exact),
    traced again (a traced graph bakes its dtype), the same adapters with their state in fp32, unmerged.
    Costs the fp32 weights once; ``gm`` is untouched."""
    model = gm.lrc_face.model
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point() and id(t) not in memo:
            up = t.detach().float()
            memo[id(t)] = nn.Parameter(up, requires_grad=False) if isinstance(t, nn.Parameter) else up
    twin = trace(copy.deepcopy(model, memo).eval())
    apply_records(twin, [{**r, "merged": False} for r in adapter_records(gm)], "the model's adapters")
    theirs = adapters_of(twin)
    with torch.no_grad():
        for site, mod in adapters_of(gm).items():
            theirs[site].load_state_dict({k: v.float() if v.is_floating_point() else v
                                          for k, v in mod.state_dict().items()})
            if mod.merged:  # the shared base weight holds W + ΔW: the twin's adapter is separate again
                mark = next(n.meta[META_KEY] for n in adapter_nodes(twin) if n.meta[META_KEY].site == site)
                set_logical_weight(twin, mark, theirs[site].unmerged_weight(logical_weight(twin, mark)))
    lrc_meta(twin).update({k: v for k, v in lrc_meta(gm).items() if k == "base_model_name_or_path"})
    return twin.eval()
