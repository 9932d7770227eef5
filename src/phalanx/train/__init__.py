"""Training: the root config, the Trainer loop, checkpoints."""

from phalanx.train.config import Config, TrainConfig
from phalanx.train.setup import Pipeline, build_pipeline
from phalanx.train.trainer import Trainer

__all__ = ["Config", "Pipeline", "TrainConfig", "Trainer", "build_pipeline"]
