"""Models: load Hugging Face causal LMs (incl. the bundled SmolLM2) and cut them into stages."""

from phalanx.models.config import ModelConfig
from phalanx.models.loading import LoadedModel, load_model
from phalanx.models.stages import StageModule, lm_loss, partition, resolve_bounds, ties_embeddings

__all__ = [
    "LoadedModel",
    "ModelConfig",
    "StageModule",
    "lm_loss",
    "load_model",
    "partition",
    "resolve_bounds",
    "ties_embeddings",
]
