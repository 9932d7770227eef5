"""Schedules as data: for each stage, the ordered list of actions of one iteration.

A training iteration is the forward/backward order of the schedule (GPipe or 1F1B), then the
gradient reduction (the last stage's gradient of a tied embedding goes to stage 0, which owns it;
the global gradient norm goes through stage 0), a statistics report to stage 0, and the optimizer
step. Stage 0 then sends the updated tied embedding to the last stage, which takes it at the start
of its next plan (:func:`replica_sync`), so that transfer overlaps the next pipeline fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from phalanx.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b")


class Op(Enum):
    """What a stage does in one action."""

    FORWARD = "F"
    BACKWARD = "B"
    SEND_TIED = "send_tied"  # last stage: send its tied-parameter gradients to stage 0
    RECV_TIED = "recv_tied"  # stage 0: add them to its own
    SEND_WEIGHTS = "send_weights"  # stage 0, after its step: updated tied weights to the last stage
    RECV_WEIGHTS = "recv_weights"  # last stage: take them (its copy is a replica)
    SEND_NORM = "send_norm"  # stage > 0: send its squared gradient norm to stage 0
    GATHER_NORM = "gather_norm"  # stage 0: sum all squared norms, send the total back
    RECV_NORM = "recv_norm"  # stage > 0: receive the global norm
    STEP = "step"  # clip by the global norm, optimizer step
    SEND_REPORT = "send_report"  # stage > 0: send step statistics to stage 0
    GATHER_REPORT = "gather_report"  # stage 0: collect every stage's statistics


@dataclass(frozen=True)
class Action:
    """One action of a stage; ``micro`` is the micro-batch of a forward or backward."""

    op: Op
    micro: int = -1

    def __repr__(self) -> str:
        return f"{self.op.value}{self.micro}" if self.micro >= 0 else self.op.value


def gpipe(stage: int, num_stages: int, micro: int) -> list[Action]:
    """All forwards, then all backwards (in reverse micro-batch order)."""
    fwd = [Action(Op.FORWARD, m) for m in range(micro)]
    bwd = [Action(Op.BACKWARD, m) for m in reversed(range(micro))]
    return fwd + bwd


def one_f_one_b(stage: int, num_stages: int, micro: int) -> list[Action]:
    """1F1B: a warm-up of forwards, then alternate one forward and one backward, then drain.

    Stage ``s`` of ``N`` keeps at most ``N - s`` micro-batches in flight, which bounds the
    activation memory (GPipe keeps all of them).
    """
    warmup = min(num_stages - stage - 1, micro)
    actions = [Action(Op.FORWARD, m) for m in range(warmup)]
    f, b = warmup, 0
    while f < micro:
        actions.append(Action(Op.FORWARD, f))
        actions.append(Action(Op.BACKWARD, b))
        f, b = f + 1, b + 1
    actions += [Action(Op.BACKWARD, m) for m in range(b, micro)]
    return actions


def compute_order(name: str, stage: int, num_stages: int, micro: int) -> list[Action]:
    """Forward/backward order of ``stage`` under schedule ``name``."""
    if name == "gpipe":
        return gpipe(stage, num_stages, micro)
    if name == "1f1b":
        return one_f_one_b(stage, num_stages, micro)
    raise ConfigError(f"pipeline.schedule={name!r} is unknown; use one of {', '.join(SCHEDULES)}")


def has_replica(stage: int, num_stages: int, tied: bool) -> bool:
    """Whether ``stage`` holds a replica of a tied parameter owned by stage 0."""
    return tied and num_stages > 1 and stage == num_stages - 1


def reduce_actions(stage: int, num_stages: int, tied: bool) -> list[Action]:
    """Gradient reduction of one iteration (before the optimizer step)."""
    acts: list[Action] = []
    if has_replica(stage, num_stages, tied):
        acts.append(Action(Op.SEND_TIED))
    if tied and num_stages > 1 and stage == 0:
        acts.append(Action(Op.RECV_TIED))
    acts += [Action(Op.GATHER_NORM)] if stage == 0 else [Action(Op.SEND_NORM), Action(Op.RECV_NORM)]
    return acts


def replica_sync(stage: int, num_stages: int, tied: bool) -> list[Action]:
    """What the last stage does before using its replica after an optimizer step."""
    return [Action(Op.RECV_WEIGHTS)] if has_replica(stage, num_stages, tied) else []


def report_action(stage: int) -> Action:
    """The statistics exchange that ends an iteration."""
    return Action(Op.GATHER_REPORT) if stage == 0 else Action(Op.SEND_REPORT)


def train_actions(
    name: str, stage: int, num_stages: int, micro: int, tied: bool, step: bool = True,
    frozen_front: int = 0,
) -> list[Action]:
    """One training iteration of ``stage``; ``step=False`` stops before the optimizer step.
    The first ``frozen_front`` stages train nothing: they run no backward.

    Stages > 0 report before their step, so stage 0 never waits for another stage's optimizer.
    """
    order = compute_order(name, stage, num_stages, micro)
    if stage < frozen_front:
        order = [a for a in order if a.op is not Op.BACKWARD]
    acts = order + reduce_actions(stage, num_stages, tied)
    if stage > 0:
        return acts + [report_action(stage)] + ([Action(Op.STEP)] if step else [])
    if step:
        acts.append(Action(Op.STEP))
        if tied and num_stages > 1:
            acts.append(Action(Op.SEND_WEIGHTS))
    return acts + [report_action(stage)]


def eval_actions(stage: int, micro: int) -> list[Action]:
    """A forward-only pass over ``micro`` micro-batches, the norm exchange (it carries what
    overseers report, and stage 0's verdict on the pass), then the report."""
    norm = [Action(Op.GATHER_NORM)] if stage == 0 else [Action(Op.SEND_NORM), Action(Op.RECV_NORM)]
    return [Action(Op.FORWARD, m) for m in range(micro)] + norm + [report_action(stage)]
