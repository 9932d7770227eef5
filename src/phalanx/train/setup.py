"""From a config to a running pipeline: load the model, cut it, start the runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from phalanx.comm import Channel
from phalanx.comm.faults import Fault, with_faults
from phalanx.defense.receipts import Notary
from phalanx.defense.replica import add_replica
from phalanx.defense.wiring import Duplicate
from phalanx.models import (
    LoadedModel,
    ModelConfig,
    StageModule,
    load_model,
    partition,
    ties_embeddings,
)
from phalanx.pipeline import LocalRuntime, Runtime, StageWorker
from phalanx.pipeline.devices import stage_devices
from phalanx.pipeline.limits import run_limits
from phalanx.secure.signing import LocalKeys
from phalanx.split.config import SERVER
from phalanx.split.link import OVERHEAD
from phalanx.split.masking import LocalHost
from phalanx.split.outsource import Outsourced, outsource
from phalanx.split.prepare import cuts as split_cuts
from phalanx.split.prepare import prepare
from phalanx.split.wiring import EnclaveWiring, platform_dir, sealed_suffixes
from phalanx.threats import AttackPlan
from phalanx.threats.adaptive import adaptive
from phalanx.threats.channel import poison
from phalanx.train.checkpoint import StageStore
from phalanx.train.config import Config
from phalanx.wire import Limits


@dataclass
class Pipeline:
    """A started runtime and the model it was cut from."""

    runtime: Runtime
    loaded: LoadedModel
    attack: AttackPlan
    defense: Duplicate | None = None
    enclave: EnclaveWiring | None = None
    stores: dict[int, StageStore] = field(default_factory=dict)  # stage -> its file's format
    suffixes: dict[int, str] = field(default_factory=dict)  # every stage's file, if not plain
    masked: Outsourced | None = None  # the server's layers outsourced to its host (here)


def wrapper(attack: AttackPlan, defense: Duplicate | None, faults: list[Fault] = (),
            fault_seed: int = 0, enclave: EnclaveWiring | None = None):  # noqa: ANN201
    """The channel wrapping of a run: declared network faults next to the transport, then the
    split's sessions with the enclave (what a stage's code sends is encrypted; what the network
    or a host does to it is caught), then an adaptive attacker's rewriting of everything its
    stage sends (under the defense: the attacker owns its whole process), then the defense's
    links, then the paper's poisoning on the malicious stages' pipeline links (outermost, so
    what an attacker sends is what every link carries)."""
    n = attack.num_stages

    def wrap(stage: StageModule, channels: dict[int, Channel]) -> dict[int, Channel]:
        if faults:
            channels = with_faults(channels, stage.index, list(faults), fault_seed)
        if enclave is not None:
            channels = enclave.wrap(stage, channels)
        if attack.cfg.active and attack.cfg.adaptive != "none":
            channels = adaptive(channels, attack, stage, n)
        if defense is not None:
            channels = defense.wrap(stage, channels)
        return poison(channels, attack, stage) if attack.cfg.naive else channels

    return wrap


def attacher(defense: Duplicate | None):  # noqa: ANN201
    """The worker hook of a run: the defense's alerts, coordinator and verdicts."""

    def attach(worker: StageWorker) -> None:
        if defense is not None:
            defense.attach(worker)

    return attach


Loader = Callable[[ModelConfig], LoadedModel]
"""Gives a fresh model for a config (:func:`load_model`, or a cache of loaded models)."""


def load_prepared(cfg: Config, load: Loader = load_model) -> LoadedModel:
    """The model of a run, seeded, with its trainable parts and its client's layers frozen
    (``split``, ``trainable``): what every process and every reference starts from."""
    loaded = load(cfg.model)
    torch.manual_seed(cfg.train.seed)  # after loading: a cached model draws no numbers
    prepare(loaded, cfg.split, cfg.trainable)
    return loaded


def bounds_of(cfg: Config, loaded: LoadedModel) -> list[int] | None:
    """The pipeline's cut points: the split's, else ``pipeline.boundaries`` (else balanced)."""
    return split_cuts(loaded, cfg.split) or cfg.pipeline.boundaries or None


def _one_stage(cfg: Config, load: Loader, rank: int, defense: Duplicate | None
               ) -> tuple[LoadedModel, StageModule, bool]:
    """This process's stage (with the replica it verifies, under the duplicated block) and
    whether the model ties its embeddings (a fact every rank must agree on)."""
    p = cfg.pipeline
    loaded = load_prepared(cfg, load)
    cuts = bounds_of(cfg, loaded)
    (stage,) = partition(loaded.model, loaded.family, p.stages, cuts, only=rank)
    for name, i in (defense.replicated(rank) if defense is not None else {}).items():
        (original,) = partition(loaded.model, loaded.family, p.stages, cuts, only=i)
        add_replica(stage, name, original)
    return loaded, stage, ties_embeddings(loaded.model, loaded.family) and p.stages > 1


def limits_of(cfg: Config, loaded: LoadedModel, defense: Duplicate | None = None) -> Limits:
    """The largest frame of each kind this run sends (what every receiver refuses beyond)."""
    conf = loaded.model.config
    hidden = int(getattr(conf, "hidden_size", None) or conf.n_embd)
    itemsize = next(loaded.model.parameters()).element_size()
    tied = ties_embeddings(loaded.model, loaded.family) and cfg.pipeline.stages > 1
    return run_limits(micro_rows=cfg.train.batch_size // cfg.pipeline.micro_batches,
                      seq_len=cfg.data.seq_len, hidden=hidden, itemsize=itemsize,
                      tied_bytes=int(conf.vocab_size) * hidden * itemsize if tied else 0,
                      norm_bytes=defense.norm_bytes() if defense is not None else 0,
                      overhead=OVERHEAD if cfg.split.enclave != "none" else 0)


def masked_server(cfg: Config, stages: dict[int, StageModule]) -> Outsourced | None:
    """Under ``split.masked``, the server's frozen linear layers (where this process runs the
    server) outsourced to an honest host on the stage's device."""
    stage = stages.get(SERVER)
    if not cfg.split.masked or stage is None:
        return None
    device = stage_devices(cfg.pipeline.device, cfg.pipeline.stages)[SERVER]
    return outsource(stage.blocks, LocalHost(device), cfg.masking, prefix="server.")


def enclave_wiring(cfg: Config, loaded: LoadedModel, stages: dict[int, StageModule]
                   ) -> EnclaveWiring | None:
    """The enclave of a split run (``None`` without one), from this process's ``stages``
    (index -> stage, before anything moves or trains them)."""
    split = cfg.split
    if split.enclave == "none":
        return None
    reference = None  # the client's own copy of the server's initial stage, to measure
    if not split.measurement and set(stages) & set(split.clients):
        reference = stages.get(SERVER)
        if reference is None:
            (reference,) = partition(loaded.model, loaded.family, cfg.pipeline.stages,
                                     bounds_of(cfg, loaded), only=SERVER)
    return EnclaveWiring(split, platform_dir(split, cfg.train.out_dir),
                         server=stages.get(SERVER), reference=reference)


def build_pipeline(cfg: Config, total_steps: int, load: Loader = load_model) -> Pipeline:
    """Load and cut the model, then start the runtime ``cfg.pipeline.runtime`` names."""
    cfg.validate()
    p = cfg.pipeline
    attack = AttackPlan(cfg.attack, p.stages)
    defense = None
    if cfg.defense.verify == "duplicate":
        # in the simulator a side frame that is not there when needed never comes: no wait
        wait = 0.0 if p.runtime == "local" else p.timeout_s
        defense = Duplicate(cfg.defense, p.stages, wait,
                            max_micro=p.micro_batches * max(1, cfg.train.eval_batches))
    faults = cfg.faults.parsed(p.stages)
    enclave = None
    if p.runtime == "distributed":
        import torch.distributed as dist

        from phalanx.pipeline.distributed import DistributedRuntime, init_distributed

        owns_group = not dist.is_initialized()  # else a session keeps it for its next run
        rank, _, device = init_distributed(p)
        loaded, stage, tied = _one_stage(cfg, load, rank, defense)
        enclave = enclave_wiring(cfg, loaded, {rank: stage})
        masked = masked_server(cfg, {rank: stage})
        wrap = wrapper(attack, defense, faults, cfg.faults.seed, enclave)
        runtime: Runtime = DistributedRuntime(stage, p, cfg.optim, total_steps, device, tied=tied,
                                              wrap=wrap, attach=attacher(defense),
                                              owns_group=owns_group,
                                              limits=limits_of(cfg, loaded, defense))
    elif p.runtime == "secure":
        from phalanx.pipeline.process import ProcessRuntime, stage_threads
        from phalanx.secure.runtime import secure_links

        stage_threads(p)
        rank = cfg.secure.rank()
        device = stage_devices(p.device, p.stages)[rank]
        loaded, stage, tied = _one_stage(cfg, load, rank, defense)
        enclave = enclave_wiring(cfg, loaded, {rank: stage})
        masked = masked_server(cfg, {rank: stage})
        wrap = wrapper(attack, defense, faults, cfg.faults.seed, enclave)
        links, mesh = secure_links(cfg.secure, rank, p.stages, p.timeout_s,
                                   limits_of(cfg, loaded, defense))
        if defense is not None and cfg.secure.sign:
            defense.notarize(Notary(mesh.session, mesh.public_key))
        runtime = ProcessRuntime(stage, p, cfg.optim, total_steps, device, links, tied=tied,
                                 wrap=wrap, attach=attacher(defense), on_close=mesh.close)
    else:
        loaded = load_prepared(cfg, load)
        stages = partition(loaded.model, loaded.family, p.stages, bounds_of(cfg, loaded))
        enclave = enclave_wiring(cfg, loaded, dict(enumerate(stages)))
        masked = masked_server(cfg, dict(enumerate(stages)))
        wrap = wrapper(attack, defense, faults, cfg.faults.seed, enclave)
        if defense is not None:  # (a replica copies its original without the original's own)
            for stage in stages:
                for name, i in defense.replicated(stage.index).items():
                    add_replica(stage, name, stages[i])
        keys = None
        if defense is not None:  # signed links, so that receipts prove what was sent
            keys = LocalKeys(p.stages)
            defense.notarize(Notary(keys.session, keys.public))
        runtime = LocalRuntime(stages, p, cfg.optim, total_steps, wrap, attacher(defense),
                               limits=limits_of(cfg, loaded, defense),
                               sealer=keys.sealer if keys is not None else None)
    if enclave is None:
        return Pipeline(runtime=runtime, loaded=loaded, attack=attack, defense=defense,
                        masked=masked)
    try:
        enclave.open(p.timeout_s)
    except BaseException:
        runtime.close()  # the peers learn at once that this stage is gone
        raise
    return Pipeline(runtime=runtime, loaded=loaded, attack=attack, defense=defense,
                    enclave=enclave, stores=dict(enclave.stores()),
                    suffixes=sealed_suffixes(cfg.split), masked=masked)
