"""Pipeline engine: schedules as data, the StageWorker, and the local / distributed runtimes."""

from phalanx.pipeline.config import PipelineConfig
from phalanx.pipeline.optim import OptimConfig, StageOptimizer
from phalanx.pipeline.runtime import LocalRuntime, Runtime, simulate, split_micro
from phalanx.pipeline.schedule import Action, Op, train_actions
from phalanx.pipeline.stats import IterationResult, StageStats
from phalanx.pipeline.worker import StageWorker

__all__ = [
    "Action",
    "IterationResult",
    "LocalRuntime",
    "Op",
    "OptimConfig",
    "PipelineConfig",
    "Runtime",
    "StageOptimizer",
    "StageStats",
    "StageWorker",
    "simulate",
    "split_micro",
    "train_actions",
]
