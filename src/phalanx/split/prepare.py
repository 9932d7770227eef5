"""A loaded model made ready for (split) fine-tuning: what trains, and where the cut is.

The trainable parts are added to the model *before* it is cut into stages, so every stage keeps
its parameters' names in the unsplit model and the pipeline's training can be checked against
single-process (centralized) training of the very same prepared model."""

from __future__ import annotations

from torch import nn

from phalanx.models import LoadedModel
from phalanx.models.stages import blocks_of, embedding_of, ties_embeddings
from phalanx.split.config import SplitConfig
from phalanx.split.trainable import TrainableConfig, TrainableSummary, apply_trainable


def prepare(loaded: LoadedModel, split: SplitConfig, trainable: TrainableConfig
            ) -> TrainableSummary | None:
    """Freeze the client's layers, add ``trainable``'s parts to the server's layers (every
    layer when not split), in place; ``None`` when neither is asked for (full training)."""
    if not split.active and trainable.method == "full":
        return None
    model, family = loaded.model, loaded.family
    blocks = blocks_of(model, family)
    model.requires_grad_(False)
    owned = nn.ModuleList([blocks[i] for i in split.server_layers(len(blocks))])  # shared
    head = trainable.method == "full" and split.mode == "layers"  # the server's head trains
    if head:
        _untie(model, family)
    _untie_frozen(model, family)
    summary = apply_trainable(owned, trainable)
    if head:
        for p in _head_params(model, family):
            p.requires_grad_(True)
            summary.count += p.numel()
    return summary


def cuts(loaded: LoadedModel, split: SplitConfig) -> list[int] | None:
    """The pipeline's cut points under ``split`` (``None``: not split)."""
    return split.cuts(len(blocks_of(loaded.model, loaded.family))) if split.active else None


def _head_params(model: nn.Module, family: str) -> list[nn.Parameter]:
    return [*model.lm_head.parameters(), *_final_norm(model, family).parameters()]


def _final_norm(model: nn.Module, family: str) -> nn.Module:
    return model.model.norm if family == "llama" else model.transformer.ln_f


def _untie_frozen(model: nn.Module, family: str) -> None:
    """A frozen input embedding keeps its values: the head gets its own copy, so no stage
    needs the other's gradient or weights of a shared matrix (nothing of it ever moves)."""
    if ties_embeddings(model, family) and not embedding_of(model, family).weight.requires_grad:
        _untie(model, family)


def _untie(model: nn.Module, family: str) -> None:
    if ties_embeddings(model, family):
        w = embedding_of(model, family).weight
        model.lm_head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        model.config.tie_word_embeddings = False
