"""A draft model cut from the target itself: its first N decoder layers, then its own final
norm and LM head ("self-speculative early exit", as in LayerSkip / Draft & Verify, without
the training those papers add). It shares the target's tokenizer and vocabulary by
construction, so it serves as the engine's draft model and as transformers'
`assistant_model` when no second small model is at hand (bench.gpu_decode --draft-layers).
bench.diagnostics.draft_truncated measures how often such an exit agrees with the full model.
"""

from __future__ import annotations

import copy

import torch

from service.models.loading import LoadedModel


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
        raise ValueError(
            f"{type(model).__name__} has no `model.layers` / `model.norm`: not a Llama-style decoder"
        )
    return decoder


def truncated_draft(target: LoadedModel, num_layers: int) -> LoadedModel:
    """A deep copy of `target` keeping its first `num_layers` decoder layers, its embeddings,
    final norm and LM head (config.num_hidden_layers = num_layers).

    Nothing is shared with the target: the engine fuses each model's projection weights
    in place (service/engine/execution/model_forward.py), so draft and target must own their layers.
    Build it before any Engine or torch.compile has touched the target.
    """
    model = target.model
    layers = decoder_of(model).layers
    total = len(layers)
    if not 1 <= num_layers < total:
        raise ValueError(
            f"draft layers must be in [1, {total - 1}] for a target of {total} layers, got {num_layers}"
        )
    # The layers beyond the cut map to themselves in the deepcopy memo: they are not copied,
    # and the copy's layer list drops them right after.
    memo = {id(layer): layer for layer in list(layers)[num_layers:]}
    draft = copy.deepcopy(model, memo)
    decoder = decoder_of(draft)
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:num_layers])
    config = draft.config
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    draft.eval()
    for p in draft.parameters():
        p.requires_grad_(False)
    target_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in target_params for p in draft.parameters()), (
        "draft shares a parameter with the target"
    )
    return LoadedModel(
        name=f"{target.name}[first {num_layers} of {total} layers]",
        model=draft,
        tokenizer=target.tokenizer,
        device=target.device,
        dtype=target.dtype,
    )
