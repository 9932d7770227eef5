"""The root config: one small config per component, composed."""

from __future__ import annotations

from dataclasses import dataclass, field

from phalanx.comm.faults import FaultConfig
from phalanx.data import DataConfig
from phalanx.defense.config import DefenseConfig
from phalanx.errors import ConfigError
from phalanx.models import ModelConfig
from phalanx.pipeline import OptimConfig, PipelineConfig
from phalanx.privacy.exposure import ExposureConfig
from phalanx.secure.config import SecureConfig
from phalanx.split.config import SplitConfig
from phalanx.split.masking import MaskingConfig
from phalanx.split.trainable import TrainableConfig
from phalanx.threats import AttackConfig


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop."""

    steps: int = 20
    batch_size: int = 8  # sequences per iteration, split into pipeline.micro_batches
    eval_every: int = 0  # evaluate every k steps; 0 = only at the start and the end
    eval_batches: int = 4  # validation batches per evaluation
    checkpoint_every: int = 0  # checkpoint every k steps; 0 = only at the end
    save: bool = True  # write checkpoints at all (the demo does not)
    out_dir: str = "runs/train"
    seed: int = 0
    progress: bool = True  # progress bar on the terminal


@dataclass(kw_only=True)
class Config:
    """Everything a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    trainable: TrainableConfig = field(default_factory=lambda: TrainableConfig(method="full"))
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    privacy: ExposureConfig = field(default_factory=ExposureConfig)

    def validate(self) -> None:
        """Check every component and the settings that involve several of them."""
        self.pipeline.validate()
        self.optim.validate()
        self.attack.validate(self.pipeline.stages)
        self.defense.validate(self.pipeline.stages)
        self.secure.validate(self.pipeline.runtime)
        self.faults.parsed(self.pipeline.stages)
        self.split.validate()
        self.trainable.validate()
        self.masking.validate()
        self.privacy.validate()
        if self.split.masked and self.pipeline.precision != "fp32":
            raise ConfigError(f"split.masked needs pipeline.precision=fp32, not "
                              f"{self.pipeline.precision}: a mask costs log2(masking.mask_scale) "
                              "mantissa bits")
        if self.split.active:
            if self.pipeline.boundaries:
                raise ConfigError("split.mode sets the cut: leave pipeline.boundaries empty "
                                  "(split.cut, split.tail)")
            self.pipeline.stages = self.split.stages  # client, server (, client)
        # the client's front layers are frozen: no gradient goes back to them (nothing of the
        # server's model flows to the client); the duplicated block keeps its own plans
        self.pipeline.frozen_front = int(self.split.active and self.defense.verify == "none")
        if self.split.enclave != "none" and self.defense.verify != "none":
            raise ConfigError("split.enclave keeps the server's layers to the enclave; the "
                              "duplicated block would replicate them at the client: set "
                              "defense.verify=none")
        t = self.train
        if t.steps < 1 or t.batch_size < 1 or t.eval_batches < 1:
            raise ConfigError("train.steps, train.batch_size and train.eval_batches must be >= 1")
        if t.eval_every < 0 or t.checkpoint_every < 0:
            raise ConfigError("train.eval_every and train.checkpoint_every must be >= 0")
        if t.batch_size % self.pipeline.micro_batches:
            raise ConfigError(
                f"train.batch_size={t.batch_size} is not a multiple of "
                f"pipeline.micro_batches={self.pipeline.micro_batches}"
            )
        if not 0.0 <= self.model.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.model.dropout} must be in [0, 1)")
