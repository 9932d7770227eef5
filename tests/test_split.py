"""Split fine-tuning by layers as the engine runs it: a client (data owner) with the first
layers frozen, a server with the trainable parts; the split pipeline trains exactly as the same
prepared model would in one process, and only what should train moves."""

from __future__ import annotations

import json

import pytest
import torch

from phalanx.cli.main import main
from phalanx.config import load_config
from phalanx.train import Config, Trainer
from phalanx.train.equivalence import check_local, first_batch, reference_for
from phalanx.train.setup import load_prepared

TINY = ['model.name="tiny"', "data.seq_len=16", "train.batch_size=4", "pipeline.micro_batches=2",
        "train.eval_batches=1", "train.progress=false", "optim.lr=1e-2", "optim.warmup_steps=0"]


def _cfg(*extra: str) -> Config:
    cfg = load_config(Config, None, [*TINY, *extra])
    cfg.validate()
    return cfg


@pytest.mark.parametrize(("mode", "method", "schedule"), [
    ("layers", "lora", "gpipe"), ("layers", "ptuning", "1f1b"), ("layers", "full", "gpipe"),
    ("u", "lora+spf", "1f1b"), ("u", "ptuning", "gpipe"),
])
def test_split_pipeline_step_equals_the_centralized_step_of_the_same_model(mode, method,
                                                                           schedule):
    cfg = _cfg(f'split.mode="{mode}"', "split.cut=1", f'trainable.method="{method}"',
               f'pipeline.schedule="{schedule}"')
    assert cfg.pipeline.stages == {"layers": 2, "u": 3}[mode]
    rec = check_local(cfg)
    assert rec["ok"], rec
    loaded = load_prepared(cfg)
    _, ref = reference_for(cfg, loaded.model, first_batch(cfg, loaded.tokenizer))
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and set(ref) == trainable  # every trainable part has its gradient checked
    assert not any(".layers.0." in n or "embed_tokens" in n for n in trainable)  # the client's
    if mode == "u":  # the client's tail layer and head stay frozen too
        assert not any(".layers.3." in n or "lm_head" in n or "model.norm" in n
                       for n in trainable)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_training_moves_the_servers_adapters_alone(tmp_path):
    """Three steps of split LoRA: the client's layers and every base weight are bitwise what
    they were; the adapters moved and the loss fell."""
    cfg = _cfg('split.mode="layers"', "split.cut=2", 'trainable.method="lora"',
               "train.steps=3", "train.save=false", f'train.out_dir="{tmp_path}"')
    start = _weights(load_prepared(cfg).model)
    trainer = Trainer(cfg)
    try:
        trainer.run()
        after = {}
        for w in trainer.pipe.runtime.workers:
            for local, p in w.stage.named_parameters():
                if local in w.stage.names:
                    after[w.stage.names[local]] = p.detach().clone()
    finally:
        trainer.close()
    moved = {n for n in start if not torch.equal(start[n], after[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:5]
    assert all(".layers.2." in n or ".layers.3." in n for n in moved)  # the server's layers
    losses = [json.loads(r)["loss"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("args", "message"), [
    (['split.mode="layers"', "split.cut=4"], "leaves the server none of the model's 4 layers"),
    (['split.mode="u"', "split.cut=2", "split.tail=2"], "split.cut + split.tail=4"),
    (['split.mode="layers"', "split.cut=0"], "split.cut=0 must be an integer >= 1"),
    (['split.mode="sideways"'], "split.mode='sideways' is unknown"),
    (['split.mode="layers"', "pipeline.boundaries=[2]"], "leave pipeline.boundaries empty"),
    (['trainable.method="lora+spf"', "trainable.spf_fraction=0"], "spf_fraction"),
    (['trainable.method="lora+spf"', "trainable.spf_fraction=1.5"], "spf_fraction"),
    (['trainable.method="adapters"'], "trainable.method='adapters' is unknown"),
    (['trainable.method="lora+spf"', "trainable.spf_scale=0"], "spf_scale=0.0 must be in (0, 1]"),
])
def test_bad_split_settings_are_one_line_exit_2(tmp_path, capsys, args, message):
    code = main(["train", *TINY, "train.steps=1", f'train.out_dir="{tmp_path}"', *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_no_gradient_goes_back_to_the_clients_frozen_layers(tmp_path):
    """The client's front layers train nothing: it runs no backward and the server sends it no
    gradient (nothing computed from the server's model flows back), only the step's control
    frames; the split step still equals the centralized one (the parametrized test above)."""
    from phalanx.pipeline.schedule import Op, train_actions
    from phalanx.train.setup import build_pipeline

    cfg = _cfg('split.mode="layers"', "split.cut=1", 'trainable.method="lora"',
               f'train.out_dir="{tmp_path}"')
    assert cfg.pipeline.frozen_front == 1
    assert not any(a.op is Op.BACKWARD for a in train_actions("1f1b", 0, 2, 2, False,
                                                              frozen_front=1))
    pipe = build_pipeline(cfg, 1)
    try:
        loaded = pipe.loaded
        batch = torch.randint(0, loaded.tokenizer.vocab_size, (4, 16))
        pipe.runtime.train_step(0, batch)
        server, client = pipe.runtime.workers[1], pipe.runtime.workers[0]
        activation = 2 * 16 * int(loaded.model.config.hidden_size) * 4  # one micro-batch's
        assert client.channels[1].bytes_sent > 2 * activation  # activations and labels
        assert server.channels[0].bytes_sent < activation  # norm and report frames only
    finally:
        pipe.runtime.close()


def test_a_frozen_front_stage_with_something_to_train_is_refused():
    from phalanx.errors import ConfigError
    from phalanx.models import partition
    from phalanx.pipeline.worker import StageWorker

    cfg = _cfg('trainable.method="lora"')
    loaded = load_prepared(cfg)
    stage = partition(loaded.model, loaded.family, 2)[0]  # LoRA on its layers
    with pytest.raises(ConfigError, match="frozen front"):
        StageWorker(stage, {}, frozen_front=1)
