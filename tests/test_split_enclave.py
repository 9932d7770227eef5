"""The server's stage in an attested enclave during a split run: nothing leaves the client
before the report verifies; the server's host sees ciphertext and whatever it changes, drops,
replays or relabels is refused; the server's trained parameters leave only sealed; and the
enclave changes nothing in the training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from phalanx.comm import LocalFabric
from phalanx.comm.wrap import ChannelWrapper
from phalanx.config import load_config
from phalanx.split.attest import AttestationError
from phalanx.split.config import SplitConfig
from phalanx.split.enclave import SimulatedEnclave, SimulatedPlatform
from phalanx.split.envelope import SealError
from phalanx.split.link import ATTEST_PARTS, ClientLink, EnclaveLink, open_links
from phalanx.split.platform import load_platform, load_vendor_public, new_platform
from phalanx.split.wiring import ENCLAVE_CODE, SealedStore, measure_stage
from phalanx.train import Config, Trainer
from phalanx.wire import Frame, FrameError, Kind

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ['model.name="tiny"', "data.seq_len=16", "train.batch_size=4", "pipeline.micro_batches=2",
        "train.eval_batches=1", "train.progress=false", "optim.lr=1e-2", "optim.warmup_steps=0"]


class Spy(ChannelWrapper):
    """The server's host (or the network) on a link: records, and may rewrite, every frame."""

    def __init__(self, inner, rewrite=None) -> None:  # noqa: ANN001
        super().__init__(inner)
        self.seen: list[Frame] = []
        self.rewrite = rewrite

    def outgoing(self, frame: Frame) -> Frame | None:
        self.seen.append(frame)
        return self.rewrite(frame) if self.rewrite is not None else frame


def _enclave(platform: SimulatedPlatform, weights: float = 1.0) -> SimulatedEnclave:
    module = torch.nn.Linear(4, 4).requires_grad_(False)
    with torch.no_grad():
        module.weight.fill_(weights)
        module.bias.zero_()
    enclave = SimulatedEnclave(platform)
    enclave.load(module, code=ENCLAVE_CODE)
    return enclave


def _pair(platform: SimulatedPlatform, *, expected: bytes | None = None,
          vendor: object = None, client_host=None, server_host=None):  # noqa: ANN001, ANN202
    """A client link (stage 0) and an enclave link (stage 1) over a simulated fabric, each
    behind a spying host."""
    fabric = LocalFabric(2)
    enclave = _enclave(platform)
    c_spy = Spy(fabric.channel(0, 1), client_host)
    s_spy = Spy(fabric.channel(1, 0), server_host)
    client = ClientLink(c_spy, vendor_key=vendor or platform.vendor_public,
                        measurement=expected or enclave.measurement)
    server = EnclaveLink(s_spy, enclave)
    return client, server, c_spy, s_spy, enclave


def _activation(step: int = 0, micro: int = 0) -> Frame:
    return Frame(kind=Kind.ACTIVATION, step=step, micro=micro, src=0, dst=1,
                 tensor=torch.linspace(-3, 3, 2 * 4 * 8).reshape(2, 4, 8))


def test_after_attestation_frames_cross_the_servers_host_only_as_ciphertext():
    platform = SimulatedPlatform()
    client, server, c_spy, s_spy, _ = _pair(platform)
    open_links([client, server], timeout=5)
    sent = _activation()
    client.send(replace(sent))
    got = server.recv(timeout=1)
    assert torch.equal(got.tensor, sent.tensor) and got.kind is Kind.ACTIVATION
    wire = c_spy.seen[-1].tensor
    assert wire.dtype == torch.uint8
    assert sent.tensor.numpy().tobytes()[:64] not in wire.numpy().tobytes()
    server.send(Frame(kind=Kind.GRADIENT, step=0, micro=0, src=1, dst=0, tensor=got.tensor * 2))
    assert torch.equal(client.recv(timeout=1).tensor, sent.tensor * 2)
    assert s_spy.seen[-1].tensor.dtype == torch.uint8
    assert [f.kind for f in c_spy.seen[:2]] == [Kind.ATTEST, Kind.ATTEST]  # nonce, key


@pytest.mark.parametrize("wrong", ["measurement", "vendor"])
def test_a_report_for_another_enclave_or_vendor_is_refused_before_any_data_leaves(wrong):
    platform = SimulatedPlatform()
    kwargs = ({"expected": _enclave(platform, weights=2.0).measurement} if wrong == "measurement"
              else {"vendor": SimulatedPlatform().vendor_public})
    client, server, c_spy, _, _ = _pair(platform, **kwargs)
    with pytest.raises(AttestationError, match="measurement|signature"):
        open_links([client, server], timeout=5)
    assert [(f.kind, f.micro) for f in c_spy.seen] == [(Kind.ATTEST, ATTEST_PARTS["nonce"])]
    with pytest.raises(Exception, match="no session"):
        client.send(_activation())


def test_a_report_replayed_from_an_earlier_session_is_refused():
    platform = SimulatedPlatform()
    first, server, _, s_spy, _ = _pair(platform)
    open_links([first, server], timeout=5)
    old_report = next(f for f in s_spy.seen if f.kind is Kind.ATTEST)
    replay = lambda f: replace(f, tensor=old_report.tensor) if f.kind is Kind.ATTEST else f  # noqa: E731
    client, server, *_ = _pair(platform, server_host=replay)
    with pytest.raises(AttestationError, match="another nonce"):
        open_links([client, server], timeout=5)


def _flip(f: Frame) -> Frame:
    t = f.tensor.clone()
    t[-20] ^= 1
    return replace(f, tensor=t)


REWRITES = {  # what a host on the link may do to every field of a data frame it carries
    "flip a byte": _flip,
    "relabel the micro-batch": lambda f: replace(f, micro=f.micro + 1),
    "move it to another step": lambda f: replace(f, step=f.step + 1),
    "change its flags": lambda f: replace(f, flags=f.flags ^ 1),
    "change its kind": lambda f: replace(f, kind=Kind.LABELS if f.kind is not Kind.LABELS
                                         else Kind.ACTIVATION),
    "truncate it": lambda f: replace(f, tensor=f.tensor[:-1]),
    "reshape it": lambda f: replace(f, tensor=f.tensor[:-(f.tensor.numel() % 2) or None]
                                    .reshape(2, -1)),
    "plain tensor": lambda f: replace(f, tensor=torch.zeros(2, 4, 8)),
    "attest again": lambda f: replace(f, kind=Kind.ATTEST),
}


@pytest.mark.parametrize("direction", ["client to enclave", "enclave to client"])
@pytest.mark.parametrize("attack", [*REWRITES, "replay", "drop one"])
def test_what_the_servers_host_changes_on_an_open_link_is_refused(attack, direction):
    """Every field of a frame the host carries (contents, micro-batch, step, flags, kind,
    size, shape, dtype, order, presence), both ways: the frame is refused, never delivered."""
    platform = SimulatedPlatform()
    state = {"n": 0, "first": None}

    def host(f: Frame) -> Frame | None:
        if f.kind is Kind.ATTEST:
            return f
        state["n"] += 1
        state["first"] = state["first"] or f
        if attack == "replay":
            return replace(state["first"]) if state["n"] == 2 else f
        if attack == "drop one":
            return None if state["n"] == 1 else f
        return REWRITES[attack](f)

    upstream = direction == "client to enclave"
    client, server, *_ = _pair(platform, **{"client_host" if upstream else "server_host": host})
    open_links([client, server], timeout=5)
    sender, receiver = (client, server) if upstream else (server, client)
    for m in (0, 1):
        sender.send(_activation(micro=m))
    first = receiver.recv(timeout=1) if attack == "replay" else None
    with pytest.raises(FrameError):
        receiver.recv(timeout=1)
    assert first is None or torch.equal(first.tensor, _activation().tensor)


@pytest.mark.parametrize(("side", "rewrite", "message"), [
    ("server", lambda f: replace(f, micro=0), "not an attestation report"),
    ("server", lambda f: replace(f, tensor=f.tensor[:-1]), "must be 166 bytes"),
    ("server", _flip, "signature"),
    ("client", lambda f: replace(f, micro=2), "part 2 where part 0 belongs"),
    ("client", lambda f: replace(f, tensor=f.tensor.to(torch.int32)), "must be 32 bytes"),
])
def test_a_host_that_rewrites_a_handshake_frame_is_refused(side, rewrite, message):
    """The handshake's fields (part number, size, dtype, bytes) as a host may change them:
    refused with an error naming the check, before any session key exists."""
    def host(f: Frame) -> Frame:
        return rewrite(f) if f.kind is Kind.ATTEST and f.micro in (0, 1) else f

    client, server, *_ = _pair(SimulatedPlatform(), **{f"{side}_host": host})
    with pytest.raises(AttestationError, match=message):
        open_links([client, server], timeout=5)
    assert client.session is None


def test_a_session_message_holding_something_else_than_a_frame_is_refused():
    """A client whose encrypted message is not one tensor and its header (a malicious data
    owner, or a bug): the enclave refuses it rather than guessing."""
    platform = SimulatedPlatform()
    client, server, c_spy, *_ = _pair(platform)
    open_links([client, server], timeout=5)
    blob = client.session.encrypt({"tensor": torch.zeros(2, 4, 8)})  # no header
    c_spy.inner.send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1,
                           tensor=torch.frombuffer(bytearray(blob), dtype=torch.uint8)))
    with pytest.raises(FrameError, match="holds"):
        server.recv(timeout=1)


def test_a_data_frame_before_the_handshake_stops_the_run_with_a_clear_error():
    platform = SimulatedPlatform()
    fabric = LocalFabric(2)
    server = EnclaveLink(fabric.channel(1, 0), _enclave(platform))
    fabric.channel(0, 1).send(_activation())
    with pytest.raises(AttestationError, match="before the attestation handshake"):
        open_links([server], timeout=1)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_a_malformed_nonce_is_refused(size):
    platform = SimulatedPlatform()
    fabric = LocalFabric(2)
    server = EnclaveLink(fabric.channel(1, 0), _enclave(platform))
    fabric.channel(0, 1).send(Frame(kind=Kind.ATTEST, step=0, micro=ATTEST_PARTS["nonce"],
                                    src=0, dst=1, tensor=torch.zeros(size, dtype=torch.uint8)))
    with pytest.raises(AttestationError, match="nonce must be 32 bytes"):
        open_links([server], timeout=1)


def test_sealed_checkpoints_open_only_in_the_same_enclave_on_the_same_platform(tmp_path):
    folder = new_platform(tmp_path / "p")
    platform = load_platform(folder)
    assert load_vendor_public(folder).public_bytes_raw() == \
        platform.vendor_public.public_bytes_raw()
    store = SealedStore(_enclave(platform), 1)
    tensors = {"param.w": torch.arange(6.0).reshape(2, 3)}
    blob = store.dump(tensors)
    assert torch.equal(store.load(blob)["param.w"], tensors["param.w"])
    assert tensors["param.w"].numpy().tobytes() not in blob
    for other in (SealedStore(_enclave(SimulatedPlatform()), 1),  # another machine
                  SealedStore(_enclave(platform, weights=3.0), 1),  # another enclave build
                  SealedStore(_enclave(platform), 2)):  # another stage's label
        with pytest.raises(SealError):
            other.load(blob)


def _run(out: Path, *extra: str) -> tuple[list[float], dict, Trainer]:
    cfg = load_config(Config, None, [*TINY, f'train.out_dir="{out}"', *extra])
    cfg.validate()
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    losses = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, summary, trainer


@pytest.mark.parametrize(("mode", "method"), [("layers", "lora"), ("u", "ptuning")])
def test_the_enclave_changes_nothing_in_the_training_and_seals_the_servers_files(
        tmp_path, mode, method):
    split = [f'split.mode="{mode}"', "split.cut=1", f'trainable.method="{method}"',
             "train.steps=2"]
    plain, s_plain, _ = _run(tmp_path / "plain", *split)
    sealed, s_sealed, trainer = _run(tmp_path / "enclave", *split, 'split.enclave="simulated"')
    assert sealed == plain and s_sealed["weights_sha256"] == s_plain["weights_sha256"]
    files = sorted(p.name for p in (tmp_path / "enclave" / "checkpoints" / "step_2").iterdir())
    clients = [f"stage_{i}.safetensors" for i in SplitConfig(mode=mode).clients]
    assert files == sorted(["manifest.json", "stage_1.sealed", *clients])
    assert trainer.pipe.enclave is not None and trainer.pipe.enclave.cost()["sealed_bytes"] > 0


def test_a_run_resumes_from_its_sealed_checkpoint_as_if_never_stopped(tmp_path):
    split = ['split.mode="layers"', "split.cut=1", 'trainable.method="lora"',
             'split.enclave="simulated"']
    straight, *_ = _run(tmp_path / "a", *split, "train.steps=3")
    _run(tmp_path / "b", *split, "train.steps=3", "train.checkpoint_every=2")
    manifest = tmp_path / "b" / "checkpoints" / "latest.json"
    manifest.write_text(json.dumps({"checkpoint": "step_2"}))
    cfg = load_config(Config, None, [*TINY, f'train.out_dir="{tmp_path / "b"}"', *split,
                                     "train.steps=3", "train.checkpoint_every=2"])
    trainer = Trainer(cfg, resume=True)
    try:
        trainer.run()
    finally:
        trainer.close()
    resumed = [json.loads(r)["loss"]
               for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == straight


def test_the_measurement_a_client_computes_is_the_servers_own(tmp_path):
    from phalanx.models import partition
    from phalanx.train.setup import bounds_of, load_prepared

    cfg = load_config(Config, None, [*TINY, 'split.mode="layers"', 'trainable.method="lora"'])
    cfg.validate()
    ours, theirs = (load_prepared(cfg) for _ in range(2))  # two processes' copies
    m = [measure_stage(partition(x.model, x.family, 2, bounds_of(cfg, x), only=1)[0])
         for x in (ours, theirs)]
    assert m[0] == m[1]
    cfg.train.seed = 1  # another LoRA initialisation is another enclave
    other = load_prepared(cfg)
    assert measure_stage(partition(other.model, other.family, 2, bounds_of(cfg, other),
                                   only=1)[0]) != m[0]


@pytest.mark.parametrize(("args", "message"), [
    (['split.enclave="simulated"'], "split.enclave needs a split"),
    (['split.mode="layers"', 'split.enclave="sgx"'], "split.enclave='sgx' is unknown"),
    (['split.mode="layers"', 'split.enclave="simulated"', 'defense.verify="duplicate"'],
     "set defense.verify=none"),
    (['split.mode="layers"', 'split.enclave="simulated"', 'split.measurement="abc"'],
     "64 hex digits"),
    (['split.mode="layers"', 'split.enclave="simulated"', 'split.platform="/nonexistent/p"'],
     "vendor_key.pem is missing"),
])
def test_bad_enclave_settings_are_one_line_exit_2(tmp_path, capsys, args, message):
    from phalanx.cli.main import main

    code = main(["train", *TINY, "train.steps=1", f'train.out_dir="{tmp_path}"', *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "phalanx.cli", *args]


def _two_parties(tmp_path: Path):  # noqa: ANN202
    """``phalanx split server`` and ``phalanx split client`` as two processes with their own
    identities; the client holds only the vendor's public key. Returns both results."""
    import shutil
    import subprocess

    from phalanx.launch.supervisor import free_port

    for who in ("c", "s"):
        subprocess.run(_cli("keys", "new", "--out", str(tmp_path / who)), check=True,
                       capture_output=True)
    subprocess.run(_cli("keys", "roster", "--out", str(tmp_path / "roster.json"),
                        str(tmp_path / "c"), str(tmp_path / "s")), check=True, capture_output=True)
    subprocess.run(_cli("split", "platform", "--out", str(tmp_path / "plat")), check=True,
                   capture_output=True)
    (tmp_path / "pins").mkdir()
    shutil.copy(tmp_path / "plat" / "vendor_public.pem", tmp_path / "pins")
    common = [*TINY, 'split.mode="layers"', "split.cut=1", 'trainable.method="lora"',
              "train.steps=2", "pipeline.timeout_s=30", f'secure.roster="{tmp_path}/roster.json"',
              f'secure.coordinator="127.0.0.1:{free_port()}"']
    server = subprocess.Popen(_cli("split", "server", *common,
                                   f'secure.key="{tmp_path}/s"',
                                   f'split.platform="{tmp_path}/plat"',
                                   f'train.out_dir="{tmp_path}/server"'),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = subprocess.run(_cli("split", "client", *common, f'secure.key="{tmp_path}/c"',
                                     f'split.platform="{tmp_path}/pins"',
                                     f'train.out_dir="{tmp_path}/client"'),
                                capture_output=True, text=True, timeout=180)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return client, server


def test_split_server_and_client_as_two_parties_train_as_one_process(tmp_path):
    """Over TLS, the server attested and sealed: the losses of the one-process run without an
    enclave (a server with other weights is refused: the in-process tests above)."""
    client, server = _two_parties(tmp_path)
    assert client.returncode == 0 and server.returncode == 0, client.stderr[-2000:]
    alone, *_ = _run(tmp_path / "alone", 'split.mode="layers"', "split.cut=1",
                     'trainable.method="lora"', "train.steps=2")
    together = [json.loads(r)["loss"]
                for r in (tmp_path / "client" / "metrics.jsonl").read_text().splitlines()]
    assert together == pytest.approx(alone, rel=1e-6)
    assert {p.name for p in (tmp_path / "server" / "checkpoints" / "step_2").iterdir()} == \
        {"stage_1.sealed"}  # the server's host keeps only the sealed file
