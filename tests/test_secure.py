"""The transport for untrusted networks: identities and roster checked, unknown keys refused
before any frame byte, tampered streams rejected, and a pipeline that trains over it exactly
as in the simulator."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from phalanx.comm import ChannelClosed
from phalanx.errors import PhalanxError
from phalanx.launch.supervisor import free_port
from phalanx.secure.identity import load_identity, load_roster, new_identity, roster_of
from phalanx.secure.link import TlsChannel
from phalanx.secure.mesh import Mesh
from phalanx.secure.tls import context, read_message, send_message
from phalanx.wire import Frame, FrameError, Kind


@pytest.fixture()
def crew(tmp_path):
    """Three admitted identities, their roster, and one identity nobody admitted."""
    ids = [new_identity(tmp_path / f"s{i}", f"stage {i}") for i in range(3)]
    roster = roster_of([(f"s{i}", x.cert_pem) for i, x in enumerate(ids)])
    roster.save(tmp_path / "roster.json")
    return ids, roster, new_identity(tmp_path / "intruder", "intruder")


def _mesh(ids, roster, port, timeout=20.0):  # noqa: ANN001, ANN202
    links, threads = {}, []

    def run(i: int) -> None:
        links[i] = Mesh(i, ids[i], roster, f"127.0.0.1:{port}", timeout=timeout).connect()

    for i in range(len(ids)):
        threads.append(threading.Thread(target=run, args=(i,), daemon=True))
    return links, threads


def _close(links) -> None:  # noqa: ANN001
    closers = [threading.Thread(target=ch.close, daemon=True)
               for per in links.values() for ch in per.values()]
    for t in closers:
        t.start()
    for t in closers:
        t.join(15)


def test_identity_files_and_key_hygiene(tmp_path):
    ident = new_identity(tmp_path / "me", "me")
    assert (tmp_path / "me" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert load_identity(tmp_path / "me").fingerprint == ident.fingerprint
    assert "PRIVATE" not in repr(ident) and ident.fingerprint[:16] in repr(ident)
    with pytest.raises(PhalanxError, match="never overwritten"):
        new_identity(tmp_path / "me", "me")
    with pytest.raises(PhalanxError, match="is missing: create an identity"):
        load_identity(tmp_path / "nobody")
    other = new_identity(tmp_path / "other", "other")
    (tmp_path / "me" / "cert.pem").write_text(other.cert_pem)
    with pytest.raises(PhalanxError, match="does not belong to the key"):
        load_identity(tmp_path / "me")
    (tmp_path / "me" / "key.pem").write_text("garbage")
    with pytest.raises(PhalanxError, match="unreadable"):
        load_identity(tmp_path / "me")


def test_roster_is_checked(tmp_path, crew):
    ids, roster, _ = crew
    assert load_roster(tmp_path / "roster.json", 3).stage_of(ids[2].fingerprint) == 2
    bad = tmp_path / "bad.json"
    cases = [("{not json", "does not parse"),
             (json.dumps({"format": "phalanx-roster-1", "stages": [
                 {"stage": 0, "cert": ids[0].cert_pem}, {"stage": 2, "cert": ids[1].cert_pem}]}),
              "must admit stages 0..N-1"),
             (json.dumps({"format": "phalanx-roster-1", "stages": [
                 {"stage": 0, "cert": ids[0].cert_pem}, {"stage": 1, "cert": ids[0].cert_pem}]}),
              "one key for two stages"),
             (json.dumps({"format": "phalanx-roster-1", "stages": [
                 {"stage": 0, "cert": "-----BEGIN CERTIFICATE-----\nAAAA\n"}]}), "does not parse")]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(PhalanxError, match=message):
            load_roster(bad)
    with pytest.raises(PhalanxError, match="admits 3 stages but pipeline.stages=4"):
        load_roster(tmp_path / "roster.json", 4)
    with pytest.raises(PhalanxError, match="does not exist"):
        load_roster(tmp_path / "none.json")


def test_unknown_key_is_refused_before_any_frame_and_the_run_goes_on(crew, caplog):
    ids, roster, intruder = crew
    port = free_port()
    links, threads = _mesh(ids, roster, port)
    threads[0].start()  # the coordinator listens; the intruder calls first
    deadline = time.monotonic() + 10
    refused = None
    while time.monotonic() < deadline and refused is None:
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            time.sleep(0.1)
            continue
        with caplog.at_level(logging.WARNING):
            try:
                s = context(intruder, roster.trusted_pem(), server=False).wrap_socket(raw)
                s.recv(1)
                refused = False
            except (OSError, ConnectionError) as exc:
                refused = exc
    assert refused, "the intruder's handshake succeeded"
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(30)
    assert {i: sorted(v) for i, v in links.items()} == {0: [1, 2], 1: [0, 2], 2: [0, 1]}
    time.sleep(0.2)
    assert "refused a connection" in caplog.text and "TLS handshake failed" in caplog.text
    x = torch.randn(1000, 7)
    links[1][2].send(Frame(kind=Kind.ACTIVATION, step=3, micro=1, src=1, dst=2, tensor=x))
    links[1][2].flush()
    f = links[2][1].recv(10)
    assert (f.kind, f.step, f.micro, f.src) == (Kind.ACTIVATION, 3, 1, 1)
    assert torch.equal(f.tensor, x)
    _close(links)


def test_a_second_connection_for_a_connected_stage_is_refused(crew, caplog):
    """Only the key decides who calls; a stage admitted once cannot open a second link."""
    ids, roster, _ = crew
    port = free_port()
    links, threads = _mesh(ids, roster, port)
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    mesh = Mesh(2, ids[2], roster, f"127.0.0.1:{port}")  # a fresh listener for stage 2
    mesh._accepted = {1}
    mesh._listen()
    with caplog.at_level(logging.WARNING):
        raw = socket.create_connection(("127.0.0.1", mesh._listener.getsockname()[1]))
        s = context(ids[1], roster.trusted_pem(), server=False).wrap_socket(raw)
        send_message(s, {"hello": ""})
        assert "already connected" in read_message(s, 10)["refused"]  # told, then hung up
        time.sleep(0.3)
    assert "already connected" in caplog.text
    mesh.close_listener()
    _close(links)


@pytest.mark.parametrize(("encrypt", "reconnect_s"), [(True, 0.0), (True, 20.0), (False, 20.0)])
def test_a_tampered_stream_is_rejected_not_decoded(crew, caplog, encrypt, reconnect_s):
    """A man in the middle flips one byte of an activation: TLS refuses the record (in the
    clear, the signature refuses the frame, reported as evidence) and no altered frame ever
    reaches the stage. Without resumption the receiver reports a failed link; with it, both
    directions are redialled and the frame arrives intact, once."""
    ids, roster, _ = crew
    two = roster_of([("a", ids[0].cert_pem), ("b", ids[1].cert_pem)])
    port, proxy_port = free_port(), free_port()
    flipped = threading.Event()

    def proxy() -> None:  # listens where stage 1 will dial stage 0; flips one byte at 20 kB
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", proxy_port))
        srv.listen(4)
        while True:
            try:
                cli, _ = srv.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", port))

            def pump(a: socket.socket, b: socket.socket, tamper: bool) -> None:
                seen = 0
                try:
                    while data := a.recv(65536):
                        if tamper and not flipped.is_set() and seen + len(data) > 20_000:
                            k = 20_000 - seen if seen < 20_000 else 0
                            data = data[:k] + bytes([data[k] ^ 0x01]) + data[k + 1:]
                            flipped.set()
                        seen += len(data)
                        b.sendall(data)
                except OSError:
                    pass  # one side hung up: the test is over

            threading.Thread(target=pump, args=(cli, up, True), daemon=True).start()
            threading.Thread(target=pump, args=(up, cli, False), daemon=True).start()

    threading.Thread(target=proxy, daemon=True).start()
    links = {}

    def run(i: int, coordinator: int) -> None:
        links[i] = Mesh(i, ids[i], two, f"127.0.0.1:{coordinator}", timeout=20,
                        reconnect_s=reconnect_s, encrypt=encrypt).connect()

    t0 = threading.Thread(target=run, args=(0, port))
    t1 = threading.Thread(target=run, args=(1, proxy_port))  # stage 1 dials 0 through the proxy
    t0.start()
    time.sleep(0.2)
    t1.start()
    t0.join(30)
    t1.join(30)
    x = torch.arange(50_000, dtype=torch.float32)
    links[1][0].send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=1, dst=0, tensor=x))
    links[1][0].flush()
    with caplog.at_level(logging.WARNING):
        if not encrypt:
            with pytest.raises(FrameError, match="signature does not verify"):
                links[0][1].recv(15)
        if reconnect_s:
            f = links[0][1].recv(15)
            assert torch.equal(f.tensor, x) and f.seq == 1
            assert links[0][1].poll() is None  # delivered once
            assert "resumed" in caplog.text
            assert ("bad record mac" if encrypt else "signature") in caplog.text.lower()
        else:
            with pytest.raises(ChannelClosed, match="failed"):
                links[0][1].recv(10)
    assert flipped.is_set()
    _close(links)


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phalanx.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


TINY = ['model.name="tiny"', "data.seq_len=32", "train.batch_size=4", "pipeline.micro_batches=2",
        "train.eval_batches=2", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=1",
        "pipeline.stages=4", "train.steps=3", "pipeline.timeout_s=60"]


@pytest.mark.slow
def test_stages_started_by_hand_with_keys_roster_and_a_join_token(tmp_path, cli):
    """The several-hosts recipe on one host: `phalanx keys`, a roster with stage 2 left open,
    then one `phalanx train` per stage with secure.stage, stage 2 binding the key it made with
    its join token; a stage whose key is not in the roster is refused."""
    assert _cli("keys", "new", "--out", str(tmp_path / "k0")).returncode == 0
    for name in ("k1", "k2", "evil"):  # the same call, in this process (a process start less)
        new_identity(tmp_path / name, name)
    r = _cli("keys", "roster", "--out", str(tmp_path / "roster.json"),
             str(tmp_path / "k0"), str(tmp_path / "k1"), "-")
    assert r.returncode == 0, r.stderr
    (tmp_path / "token2").write_text(json.loads(r.stdout)["tokens"]["2"])
    port = free_port()
    common = [*TINY[:-3], "pipeline.stages=3", "train.steps=2", "pipeline.timeout_s=40",
              'pipeline.runtime="secure"', f'secure.coordinator="127.0.0.1:{port}"',
              f'train.out_dir="{tmp_path / "run"}"']
    owner = [f'secure.roster="{tmp_path / "roster.json"}"']
    joiner = [f'secure.token="{tmp_path / "token2"}"',
              f'secure.roster="{tmp_path / "roster_of_2.json"}"']
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    code, err = cli("train", *common, *owner, "secure.stage=1", f'secure.key="{tmp_path / "evil"}"')
    assert code == 2 and "is not the roster's stage 1" in err
    procs = [subprocess.Popen([sys.executable, "-m", "phalanx.cli", "train", *common,
                               *(joiner if i == 2 else owner),
                               f"secure.stage={i}", f'secure.key="{tmp_path / f"k{i}"}"'],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(3)]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-1500:] for o in outs]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    bound = load_roster(tmp_path / "roster.json")
    assert bound.stage_of(load_identity(tmp_path / "k2").fingerprint) == 2
    assert [t.used for t in bound.tokens] == [True]


def test_a_used_join_token_is_one_line_exit_2(tmp_path, serve_coordinator):
    from phalanx.secure.join import token_text

    ids = [new_identity(tmp_path / f"s{i}", f"s{i}") for i in range(2)]
    roster = roster_of([(f"s{i}", x.cert_pem) for i, x in enumerate(ids)])
    roster.path = tmp_path / "roster.json"
    secret = roster.new_token(1)
    roster.tokens[0].used = True
    roster.save()
    port = free_port()
    coordinator = Mesh(0, ids[0], roster, f"127.0.0.1:{port}", timeout=60)
    serve_coordinator(coordinator)
    (tmp_path / "t").write_text(token_text(1, secret, roster.members[0].fingerprint))
    new_identity(tmp_path / "me", "me")
    r = _cli("train", *TINY[:-3], "pipeline.stages=2", 'pipeline.runtime="secure"',
             "secure.stage=1", f'secure.key="{tmp_path / "me"}"',
             f'secure.token="{tmp_path / "t"}"',
             f'secure.coordinator="127.0.0.1:{port}"', timeout=120)
    coordinator.close()
    assert r.returncode == 2, r.stderr[-1500:]
    assert "was already used: ask the data owner for a new one" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (['pipeline.runtime="secure"', "secure.stage=1"], "needs secure.key, secure.roster"),
        (['pipeline.runtime="secure"', 'secure.coordinator="nohost"'], "is not an address"),
        (['pipeline.runtime="secure"', "secure.reconnect_s=-1"], "secure.reconnect_s=-1"),
    ],
)
def test_secure_bad_input_is_one_line_exit_2(args, message, capsys):
    from phalanx.cli.main import main

    code = main(["train", 'model.name="tiny"', "pipeline.stages=2", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _keys(ident):  # noqa: ANN001, ANN202
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(ident.key_path.read_bytes(), None)
    return key, x509.load_pem_x509_certificate(ident.cert_pem.encode()).public_key()


def test_signed_frames_carry_evidence_the_coordinator_can_check(crew):
    """Every frame but the data owner's tied transfers is signed; the receiver keeps the
    verified digest and signature, which prove to anyone with the roster what the peer sent."""
    import hashlib

    from phalanx.secure.signing import Signer, verify_evidence
    from phalanx.wire import encode_header, payload_tensor

    ids, _, _ = crew
    (k0, p0), (k1, p1) = _keys(ids[0]), _keys(ids[1])
    a_out, b_inc = socket.socketpair()
    b_out, a_inc = socket.socketpair()
    a = TlsChannel(0, 1, a_out, a_inc, signer=Signer(k0, p1))  # type: ignore[arg-type]
    b = TlsChannel(1, 0, b_out, b_inc, signer=Signer(k1, p0))  # type: ignore[arg-type]
    x = torch.randn(64, 9)
    a.send(Frame(kind=Kind.ACTIVATION, step=2, micro=1, src=0, dst=1, tensor=x))
    a.send(Frame(kind=Kind.TIED_WEIGHT, step=2, micro=0, src=0, dst=1, tensor=x))
    a.flush()
    f, tied = b.recv(5), b.recv(5)
    raw = payload_tensor(x).numpy().tobytes()
    assert f.digest == hashlib.sha256(raw).digest() and len(f.signature) == 64
    header = encode_header(Frame(kind=Kind.ACTIVATION, step=2, micro=1, src=0, dst=1,
                                 tensor=x, seq=1), len(raw))
    assert verify_evidence(p0, b"", header, f.digest, f.signature)
    assert not verify_evidence(p1, b"", header, f.digest, f.signature)  # not stage 1's words
    assert not verify_evidence(p0, b"", header, hashlib.sha256(b"other").digest(), f.signature)
    assert not verify_evidence(p0, b"another run", header, f.digest, f.signature)
    assert tied.signature == b"" and torch.equal(tied.tensor, x)
    for ch in (a, b):
        threading.Thread(target=ch.close, daemon=True).start()


def test_a_forged_signature_is_refused_and_closes_the_link(crew):
    from phalanx.secure.signing import Signer
    from phalanx.wire import FrameError, encode

    ids, _, intruder = crew
    (_, p0), (k1, _), (ki, _) = _keys(ids[0]), _keys(ids[1]), _keys(intruder)
    theirs, ours = socket.socketpair()
    out, _ = socket.socketpair()
    ch = TlsChannel(1, 0, out, ours, signer=Signer(k1, p0))  # type: ignore[arg-type]
    frame = Frame(kind=Kind.GRADIENT, step=0, micro=0, src=0, dst=1, tensor=torch.ones(4),
                  seq=1)
    data = encode(frame)
    theirs.sendall(data + Signer(ki, p0).sign(data[:128], data[128:]))  # signed by another key
    with pytest.raises(FrameError, match="signature does not verify"):
        ch.recv(5)
    with pytest.raises(ChannelClosed, match="malformed"):
        ch.recv(5)
    theirs.close()


def test_authenticated_links_in_the_clear_still_check_signatures(crew):
    """encrypt=false (for benchmarks, or links that need no secrecy): TLS authenticates the
    peers, then frames travel in the clear, signed."""
    ids, roster, _ = crew
    port = free_port()
    links = {}

    def run(i: int) -> None:
        links[i] = Mesh(i, ids[i], roster, f"127.0.0.1:{port}", timeout=20,
                        encrypt=False).connect()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ch = links[2][0]
    assert getattr(ch._out, "_sslobj", None) is None  # the TLS layer is gone after the handshake
    links[0][2].send(Frame(kind=Kind.LABELS, step=0, micro=0, src=0, dst=2,
                           tensor=torch.arange(6)))
    links[0][2].flush()
    f = ch.recv(10)
    assert torch.equal(f.tensor, torch.arange(6)) and len(f.signature) == 64
    _close(links)


# -- found by attacking the transport (each failed before its fix) -------------------------

def test_an_admitted_stage_that_never_speaks_cannot_hang_the_coordinator(crew):
    ids, roster, _ = crew
    port = free_port()
    err = {}

    def coordinator() -> None:
        try:
            Mesh(0, ids[0], roster, f"127.0.0.1:{port}", timeout=3).connect()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            err["e"] = exc

    t = threading.Thread(target=coordinator, daemon=True)
    t.start()
    time.sleep(0.3)
    silent = []
    for i in (1, 2):  # both admitted stages complete TLS, then say nothing
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        silent.append(context(ids[i], roster.trusted_pem(), server=False).wrap_socket(raw))
    t.join(15)
    assert not t.is_alive() and type(err["e"]).__name__ == "ChannelTimeout"
    for s in silent:
        s.close()


def test_a_peer_that_stops_reading_fails_the_send_in_bounded_time():
    a_out, peer_in = socket.socketpair()
    a_in, _peer_out = socket.socketpair()
    a_out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ch = TlsChannel(0, 1, a_out, a_in, timeout=1.0)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(ChannelClosed):
        for _ in range(200):
            ch.send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1,
                          tensor=torch.zeros(64 * 1024)))
        ch.flush()
    assert time.monotonic() - t0 < 20
    peer_in.close()


def test_tied_transfers_are_refused_on_a_link_to_an_untrusted_stage():
    from phalanx.wire import FrameError, encode

    theirs, ours = socket.socketpair()
    out, _ = socket.socketpair()
    ch = TlsChannel(0, 1, out, ours, stages=4)  # type: ignore[arg-type]
    theirs.sendall(encode(Frame(kind=Kind.TIED_WEIGHT, step=1, micro=7, src=1, dst=0,
                                tensor=torch.ones(8), seq=1)))
    with pytest.raises(FrameError, match="tied transfers pass only between stages 0 and N-1"):
        ch.recv(5)
    theirs.close()


def test_deeply_nested_rendezvous_json_is_a_clear_error():
    from phalanx.secure.tls import read_message
    from phalanx.wire import FrameError

    a, b = socket.socketpair()
    body = b"[" * 60_000
    b.sendall(len(body).to_bytes(4, "little") + body)
    with pytest.raises(FrameError, match="nested too deep"):
        read_message(a, 5)  # type: ignore[arg-type]
    a.close()
    b.close()


def test_keys_token_keeps_only_the_hash_and_refuses_stage_0(tmp_path):
    for i in range(2):
        assert _cli("keys", "new", "--out", str(tmp_path / f"k{i}")).returncode == 0
    roster = tmp_path / "roster.json"
    assert _cli("keys", "roster", "--out", str(roster), str(tmp_path / "k0"),
                str(tmp_path / "k1")).returncode == 0
    r = _cli("keys", "token", "--roster", str(roster), "--stage", "1")
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["token"]
    secret = token.split(":")[2]
    assert secret not in roster.read_text() and len(load_roster(roster).tokens) == 1
    bad = _cli("keys", "token", "--roster", str(roster), "--stage", "0")
    assert bad.returncode == 2 and "stage 0 is the coordinator" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_secure_files_and_addresses_that_do_not_work_are_one_line_exit_2(tmp_path, capsys):
    """A stage started by hand: a key folder without a key, a roster that does not parse, a
    coordinator nobody listens at (in this process: the console script's ``main``)."""
    from phalanx.cli.main import main
    new_identity(tmp_path / "k1", "k1")
    (tmp_path / "roster.json").write_text('{"format": "phalanx-roster-1", "stages": [}')
    ids = [new_identity(tmp_path / f"r{i}", f"r{i}") for i in range(2)]
    roster_of([(f"r{i}", x.cert_pem) for i, x in enumerate(ids)]).save(tmp_path / "good.json")
    base = [*TINY[:-3], "pipeline.stages=2", 'pipeline.runtime="secure"', "secure.stage=1",
            "pipeline.timeout_s=3", f'secure.coordinator="127.0.0.1:{free_port()}"']
    cases = [([f'secure.key="{tmp_path / "nothing"}"', f'secure.roster="{tmp_path / "good.json"}"'],
              "is missing: create an identity"),
             ([f'secure.key="{tmp_path / "k1"}"', f'secure.roster="{tmp_path / "roster.json"}"'],
              "does not parse"),
             ([f'secure.key="{tmp_path / "r1"}"', f'secure.roster="{tmp_path / "good.json"}"'],
              "cannot reach stage 0")]
    for extra, message in cases:
        code = main(["train", *base, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err[-800:]
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
