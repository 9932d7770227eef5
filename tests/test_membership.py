"""Membership while a job runs, on the transport for untrusted networks: a broken connection
resumes without losing or repeating a frame, a peer that does not come back is dropped while
the others keep talking, its place is taken by a key bound with a one-time join token, and
every value a peer sends in these exchanges is checked."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import pytest
import torch

from phalanx.comm import ChannelClosed
from phalanx.errors import PhalanxError
from phalanx.launch.supervisor import free_port
from phalanx.secure.identity import Roster, load_roster, member_of, new_identity, roster_of
from phalanx.secure.join import join, token_text
from phalanx.secure.link import TlsChannel
from phalanx.secure.mesh import Mesh
from phalanx.secure.tls import context, send_message
from phalanx.wire import Frame, FrameError, Kind


@pytest.fixture()
def crew(tmp_path):
    ids = [new_identity(tmp_path / f"s{i}", f"stage {i}") for i in range(3)]
    roster_of([(f"s{i}", x.cert_pem) for i, x in enumerate(ids)]).save(tmp_path / "roster.json")
    return ids, tmp_path / "roster.json"


def _start(ids, rosters, port, **kw):  # noqa: ANN001, ANN202
    """Meshes of every stage (stage i with ``rosters[i]``), connected."""
    meshes = {i: Mesh(i, ids[i], rosters[i], f"127.0.0.1:{port}", timeout=20, **kw)
              for i in range(len(ids))}
    links: dict = {}
    threads = [threading.Thread(target=lambda i=i: links.__setitem__(i, meshes[i].connect()),
                                daemon=True) for i in meshes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(links) == list(range(len(ids))), "the mesh did not form"
    return meshes, links


def _frame(step: int, x: torch.Tensor) -> Frame:
    return Frame(kind=Kind.ACTIVATION, step=step, micro=0, src=0, dst=0, tensor=x)


def _shut(*meshes: Mesh) -> None:
    """End the test's meshes: no listener, no link left redialling."""
    for m in meshes:
        m.close_listener()
        for ch in m.links.values():
            ch.abandon("the test is over")


def test_a_cut_connection_resumes_with_every_frame_delivered_once_in_order(crew):
    ids, path = crew
    meshes, links = _start(ids, [load_roster(path)] * 3, free_port(), reconnect_s=20)
    sent = [torch.full((5000,), float(i)) for i in range(120)]
    a, b = links[1][2], links[2][1]

    def produce() -> None:
        for i, x in enumerate(sent):
            a.send(_frame(i, x))
            time.sleep(0.003)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    got = []
    while len(got) < len(sent):
        f = b.recv(20)
        got.append(f)
        if len(got) == 40:  # the network cuts both connections of the link
            for sock in (a._out, a._inc):
                # the first cut can make the peer drop the other connection before we reach
                # it (ENOTCONN): it is cut either way
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
    t.join(20)
    assert [f.step for f in got] == list(range(len(sent)))
    assert all(torch.equal(f.tensor, x) for f, x in zip(got, sent, strict=True))
    assert a.resumed >= 1 and b.resumed >= 1 and b.poll() is None
    a.send(_frame(999, torch.ones(3)))  # the link is whole again, both ways
    b.send(_frame(998, torch.ones(3)))
    assert b.recv(10).step == 999 and a.recv(10).step == 998
    _shut(*meshes.values())


def test_a_dead_peer_is_dropped_the_others_go_on_and_a_joined_key_takes_its_place(
        crew, tmp_path):
    ids, path = crew
    port = free_port()
    coordinator_roster = load_roster(path)
    meshes, links = _start(ids, [coordinator_roster, load_roster(path), load_roster(path)], port,
                           reconnect_s=1.5)
    dropped, met = {0: [], 1: []}, {0: threading.Event(), 1: threading.Event()}
    for i in (0, 1):
        meshes[i].on_drop = dropped[i].append
        meshes[i].on_member = lambda stage, link, i=i: met[i].set()
    meshes[2].close_listener()  # stage 2's machine goes away
    for ch in links[2].values():
        ch.abandon("crashed")
    for i in (0, 1):
        with pytest.raises(ChannelClosed, match="did not come back within 1.5 s"):
            while True:
                links[i][2].recv(15)
    assert dropped == {0: [2], 1: [2]} and meshes[0].dropped == {2}
    links[0][1].send(_frame(5, torch.arange(4.0)))  # the survivors still talk
    assert links[1][0].recv(10).step == 5

    # the data owner issues a token; a new participant binds its own key to stage 2
    secret = coordinator_roster.new_token(2)
    coordinator_roster.save()
    token = token_text(2, secret, coordinator_roster.members[0].fingerprint)
    newcomer = new_identity(tmp_path / "new2", "new 2")
    stage, roster = join(newcomer, token, ("127.0.0.1", port), 10)
    assert stage == 2 and roster.stage_of(newcomer.fingerprint) == 2
    fresh = Mesh(2, newcomer, roster, f"127.0.0.1:{port}", timeout=20, reconnect_s=1.5)
    new_links = fresh.connect()
    assert met[0].wait(10) and met[1].wait(10)
    meshes[1].links[2].send(_frame(7, torch.ones(6)))
    assert new_links[1].recv(10).step == 7
    new_links[0].send(_frame(8, torch.ones(2)))
    assert meshes[0].links[2].recv(10).step == 8
    saved = load_roster(path)  # the binding is kept: the old key is revoked, the token spent
    assert saved.stage_of(newcomer.fingerprint) == 2 and saved.stage_of(ids[2].fingerprint) is None
    assert [t.used for t in saved.tokens] == [True]
    with pytest.raises(PhalanxError, match="already used: ask the data owner for a new one"):
        join(new_identity(tmp_path / "late", "late"), token, ("127.0.0.1", port), 10)
    _shut(*meshes.values(), fresh)


def test_a_stage_left_open_in_the_roster_is_joined_with_a_token_at_the_start(crew, tmp_path):
    ids, path = crew
    two = Roster([member_of(0, "s0", ids[0].cert_pem), member_of(1, "s1", ids[1].cert_pem)],
                 path=tmp_path / "open.json")
    secret = two.new_token(2)
    two.save()
    token = token_text(2, secret, two.members[0].fingerprint)
    joiner = new_identity(tmp_path / "j2", "joiner")
    port = free_port()
    links: dict = {}
    meshes: dict = {}

    def member(i: int) -> None:
        meshes[i] = Mesh(i, ids[i], load_roster(tmp_path / "open.json"), f"127.0.0.1:{port}",
                         timeout=20)
        links[i] = meshes[i].connect()

    def joining() -> None:
        _, roster = join(joiner, token, ("127.0.0.1", port), 20)
        meshes[2] = Mesh(2, joiner, roster, f"127.0.0.1:{port}", timeout=20)
        links[2] = meshes[2].connect()

    threads = [threading.Thread(target=member, args=(0,), daemon=True),
               threading.Thread(target=member, args=(1,), daemon=True),
               threading.Thread(target=joining, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert sorted(links) == [0, 1, 2]
    links[1][2].send(_frame(1, torch.ones(9)))  # stage 1 learnt the new key from the book
    assert torch.equal(links[2][1].recv(10).tensor, torch.ones(9))
    assert load_roster(tmp_path / "open.json").stage_of(joiner.fingerprint) == 2
    _shut(*meshes.values())


def test_join_refusals_name_the_problem(crew, tmp_path, caplog, serve_coordinator):
    ids, path = crew
    roster = load_roster(path)
    secret = roster.new_token(1)
    roster.save()
    fp = roster.members[0].fingerprint
    port = free_port()
    coordinator = Mesh(0, ids[0], roster, f"127.0.0.1:{port}", timeout=30)
    serve_coordinator(coordinator)
    me = new_identity(tmp_path / "m", "m")
    with caplog.at_level(logging.WARNING):
        with pytest.raises(PhalanxError, match="not in the coordinator's roster"):
            join(me, token_text(1, b"\x01" * 32, fp), ("127.0.0.1", port), 10)
        with pytest.raises(PhalanxError, match="for stage 1, not 2"):
            join(me, token_text(2, secret, fp), ("127.0.0.1", port), 10)
        with pytest.raises(PhalanxError, match="does not hold the coordinator key"):
            join(me, token_text(1, secret, "ab" * 32), ("127.0.0.1", port), 10)
        with pytest.raises(PhalanxError, match="already admitted for another stage"):
            join(ids[2], token_text(1, secret, fp), ("127.0.0.1", port), 10)
    assert "refused a join" in caplog.text
    assert not any(t.used for t in load_roster(path).tokens)  # refusals spend nothing
    with pytest.raises(PhalanxError, match="not a join token"):
        join(me, "phalanx-join-1:1:zz", ("127.0.0.1", port), 10)
    coordinator.close()


def test_a_resumption_without_a_link_or_with_another_session_is_refused(crew, caplog):
    ids, path = crew
    meshes, links = _start(ids, [load_roster(path)] * 3, free_port())
    port1 = meshes[1]._listener.getsockname()[1]
    roster = load_roster(path)
    with caplog.at_level(logging.WARNING):
        raw = socket.create_connection(("127.0.0.1", port1), timeout=5)
        s = context(ids[2], roster.trusted_pem(), server=False).wrap_socket(raw)
        send_message(s, {"resume": "00" * 32})
        s.settimeout(5)
        try:
            assert s.recv(1) == b""
        except OSError:
            pass
        time.sleep(0.2)
    assert "asked to resume a link this stage does not have" in caplog.text
    links[2][1].send(_frame(3, torch.ones(2)))  # the real link is untouched
    assert links[1][2].recv(10).step == 3
    _shut(*meshes.values())


def test_a_peer_that_asks_to_resume_from_an_impossible_frame_closes_the_link():
    a_out, peer_in = socket.socketpair()
    a_in, _peer_out = socket.socketpair()

    def lying_redial(deadline: float) -> socket.socket:
        ours, theirs = socket.socketpair()
        send_message(theirs, {"next": 10**9})  # far past anything ever sent
        threading.Thread(target=lambda: time.sleep(30) or theirs.close(), daemon=True).start()
        return ours

    ch = TlsChannel(0, 1, a_out, a_in, redial=lying_redial, reconnect_s=5)  # type: ignore[arg-type]
    ch.send(_frame(0, torch.ones(4)))
    ch.flush()
    peer_in.close()  # the connection breaks; the "peer" answers the redial with a lie
    with pytest.raises(ChannelClosed, match="asked to resume from frame 1000000000"):
        for i in range(1, 50):
            ch.send(_frame(i, torch.ones(4)))
            ch.flush()
            time.sleep(0.05)
    assert ch.lost


def test_a_book_not_signed_by_the_coordinator_is_refused(crew):
    ids, path = crew
    m1 = Mesh(1, ids[1], load_roster(path), "127.0.0.1:1")
    m2 = Mesh(2, ids[2], load_roster(path), "127.0.0.1:1")
    forged = m2._signed({"book": ["a:1", "b:2", "c:3"], "session": "00" * 32})
    with pytest.raises(FrameError, match="coordinator's signature"):
        m1._verified(forged)
    tampered = dict(Mesh(0, ids[0], load_roster(path), "127.0.0.1:1")._signed({"x": 1}))
    tampered["signed"] = tampered["signed"].replace("1", "2")
    with pytest.raises(FrameError, match="coordinator's signature"):
        m1._verified(tampered)


# -- found by attacking the membership code (each failed before its fix) ------------------

def test_a_certificate_with_a_trailing_pem_block_is_stored_clean(crew):
    """A joiner appended a junk PEM block to its certificate: stored as sent, it made every
    trust store (and the coordinator's next start) fail to load."""
    import ssl

    ids, _ = crew
    junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    m = member_of(1, "x", ids[1].cert_pem + junk)
    assert m.cert_pem.count("BEGIN CERTIFICATE") == 1
    ssl.create_default_context().load_verify_locations(cadata=m.cert_pem)


def test_a_caller_that_trickles_its_handshake_is_cut_off_at_the_total_deadline(crew,
                                                                                monkeypatch):
    from phalanx.secure import mesh as mesh_mod

    monkeypatch.setattr(mesh_mod, "HANDSHAKE_S", 1.0)
    ids, path = crew
    port = free_port()
    m = Mesh(0, ids[0], load_roster(path), f"127.0.0.1:{port}", timeout=10)
    m._listen()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    hello = b"\x16\x03\x01" + bytes(200)
    with pytest.raises(OSError):
        for b in hello:  # one byte every 0.2 s: each read is quick, the whole is not
            s.sendall(bytes([b]))
            time.sleep(0.2)
            if time.monotonic() - t0 > 8:
                break
    assert time.monotonic() - t0 < 4
    m.close()


def test_the_receiver_refuses_a_replay_and_has_lost_frames_resent_not_skipped():
    from phalanx.wire import encode

    theirs, ours = socket.socketpair()
    out, _ = socket.socketpair()
    ch = TlsChannel(1, 0, out, ours)  # type: ignore[arg-type]

    def frame(seq: int) -> bytes:
        return encode(Frame(kind=Kind.ACTIVATION, step=seq, micro=0, src=0, dst=1,
                            tensor=torch.ones(2), seq=seq))

    theirs.sendall(frame(1) + frame(1) + frame(2) + frame(4))
    assert ch.recv(5).step == 1
    with pytest.raises(FrameError, match="sequence number 1, expected 2"):
        ch.recv(5)  # the replay: refused and reported, the stream goes on
    assert ch.recv(5).step == 2
    with pytest.raises(FrameError, match="frames were lost"):
        ch.recv(5)  # a gap is never skipped over (here, without resumption, the link closes)
    with pytest.raises(ChannelClosed):
        ch.recv(5)
    theirs.close()


def test_a_call_kept_for_a_replacement_by_a_key_no_longer_admitted_is_not_taken(crew):
    """A stage said hello while the job ran and kept the connection; after its key was
    replaced, that call must not become the new member's link."""
    from phalanx.comm.channel import ChannelTimeout

    ids, path = crew
    m = Mesh(1, ids[1], load_roster(path), "127.0.0.1:1")
    planted, other = socket.socketpair()
    m._arrived[2] = (planted, {"hello": ""}, "0" * 64)  # made with a key now revoked
    with pytest.raises(ChannelTimeout):
        m._collect({2}, time.monotonic() + 0.5)
    assert 2 not in m._arrived and planted.fileno() == -1
    other.close()


def test_a_restarted_stage_with_its_own_key_is_taken_back_once_its_old_link_is_dropped(crew):
    """It calls while the others still wait for the old connection: the coordinator tells it
    to call again, and takes it when the old link is dropped."""
    ids, path = crew
    port = free_port()
    meshes, links = _start(ids, [load_roster(path)] * 3, port, reconnect_s=2.0)
    met = {0: threading.Event(), 1: threading.Event()}
    for i in (0, 1):
        meshes[i].on_member = lambda stage, link, i=i: met[i].set()
    meshes[2].close_listener()
    for ch in links[2].values():
        ch.abandon("crashed")
    again = Mesh(2, ids[2], load_roster(path), f"127.0.0.1:{port}", timeout=20, reconnect_s=2.0)
    t0 = time.monotonic()
    new_links = again.connect()  # refused (retry) until the old link is dropped, then taken
    assert time.monotonic() - t0 >= 1.0 and met[0].wait(10) and met[1].wait(10)
    new_links[1].send(_frame(4, torch.ones(3)))
    assert meshes[1].links[2].recv(10).step == 4
    _shut(*meshes.values(), again)


def test_notices_and_frames_sent_from_two_threads_arrive_in_order(crew):
    """The coordinator's mesh sends a notice while its stage sends frames on the same link:
    numbering and queueing must be one step, or the receiver sees frames out of order."""
    ids, path = crew
    meshes, links = _start(ids, [load_roster(path)] * 3, free_port())
    got: list[dict] = []
    links[1][0]._on_notice = got.append
    a = links[0][1]

    def notices() -> None:
        for i in range(200):
            a.notice({"n": i})

    t = threading.Thread(target=notices, daemon=True)
    t.start()
    for i in range(200):
        a.send(_frame(i, torch.ones(2)))
    t.join(20)
    steps = [links[1][0].recv(10).step for _ in range(200)]
    assert steps == list(range(200)) and links[1][0].poll() is None
    deadline = time.monotonic() + 10
    while len(got) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [g["n"] for g in got] == list(range(200))
    _shut(*meshes.values())


def test_a_notice_from_a_stage_other_than_the_coordinator_is_ignored(crew, caplog):
    ids, path = crew
    meshes, links = _start(ids, [load_roster(path)] * 3, free_port())
    forged = meshes[2]._signed({"member": 1, "listen": "127.0.0.1:1", "cert": ids[1].cert_pem,
                                "session": meshes[2].session.hex()})
    with caplog.at_level(logging.WARNING):
        links[2][1].notice(forged)  # stage 2 tells stage 1 that stage 1... was replaced
        links[2][1].send(_frame(5, torch.ones(2)))
        assert links[1][2].recv(10).step == 5  # the link goes on, the notice was not taken
    assert "only the coordinator sends them" in caplog.text
    assert not meshes[1]._meeting and not links[1][0].lost and not links[1][2].lost
    _shut(*meshes.values())
