"""Does a method move its own quantity? Measured on the report easy-vqa prompts (image + question, no answer) of a
tuned VLM and of its anchor, the VLM before instruction tuning (the base LLM with the same seed's stage-1 projector):

- `mmd2_before`, `mmd2_after`: RDD's term on one prompt, RBF-MMD² (regularizers/rdd.py's `mmd2`, mean-heuristic
  bandwidth) between the prompt's text-token and visual-token embeddings at the LLM input (hidden_states[0]), of the
  anchor and of the tuned model. RDD pulls the two together, so it should lower `mmd2_after`.
- `pre_cos`: PRe's quantity, the mean over the prompt's visual tokens of the cosine between the tuned model's and
  the anchor's hidden states at PRe's default layer (the middle one; the same layer for every row, whatever layer a
  selection chose). 1 = the visual features did not move; PRe should keep it high.
- `diagnose`: `vlm-preserve diagnose`'s mixing (mean text–visual pairwise distance, pooled MMD²), effective
  dimension and redundancy of the visual tokens, at the input and at that layer, for the anchor and the tuned
  model: the same accumulators the command uses (diagnostics/run.py's LayerDiagnostics).

Text tokens are every other position of the prompt, as in `diagnose`. One prompt per forward, no gradients, fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ["mixing", "effdim", "redundancy"]


def pre_layer(num_layers: int) -> int:
    """The hidden-states index of PRe's default layer (layer k's output is hidden_states[k + 1])."""
    from ..regularizers.pre import PReConfig
    return PReConfig().layer_index(num_layers) + 1


def _hidden(vlm, ids: torch.Tensor, feats: torch.Tensor) -> list[torch.Tensor]:
    out = vlm.llm(inputs_embeds=vlm.embed(ids, feats), output_hidden_states=True)
    return [h[0].float() for h in out.hidden_states]


def measure(vlm, anchor, tok, items, features: torch.Tensor) -> tuple[list[dict], dict]:
    """(per item {mmd2_before, mmd2_after, pre_cos}, {"layers": [0, L], "before"/"after": diagnose results})."""
    from ..diagnostics.run import LayerDiagnostics
    from ..regularizers.rdd import mmd2
    from .format import prompt_ids
    layer = pre_layer(vlm.llm.config.num_hidden_layers)
    layers = [0, layer]
    diag = {k: LayerDiagnostics(METRICS, layers) for k in ("before", "after")}
    dev = vlm.projector[0].weight.device
    rows = []
    vlm.eval()
    anchor.eval()
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([prompt_ids(tok, it.question, vlm.config.image_token_id, features.shape[1])], device=dev)
            img = ids[0] == vlm.config.image_token_id
            feats = features[it.image][None].to(dev)
            hs = {"before": _hidden(anchor, ids, feats), "after": _hidden(vlm, ids, feats)}
            row = {}
            for k, h in hs.items():
                diag[k].update(h, ~img, img)
                row[f"mmd2_{k}"] = float(mmd2(h[0][~img], h[0][img]))
            row["pre_cos"] = float(F.cosine_similarity(hs["after"][layer][img], hs["before"][layer][img], dim=-1).mean())
            rows.append(row)
    return rows, {"layers": layers, **{k: d.results() for k, d in diag.items()}}
