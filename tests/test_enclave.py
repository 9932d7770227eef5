"""The enclave interface: measurement, attestation, session, sealing (simulated backend)."""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import x25519
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.split import envelope
from phalanx.split.attest import (
    PUBLIC_KEY_SIZE,
    REPORT_SIZE,
    SIGNATURE_SIZE,
    AttestationError,
    code_digest,
    derive_session_key,
    measure,
    new_nonce,
    public_bytes,
    verify_report,
    weights_digest,
)
from phalanx.split.enclave import EnclaveError, SimulatedEnclave, SimulatedPlatform
from phalanx.split.envelope import PACK_MAGIC, PACK_VERSION, SealError, unpack_tensors


class Trusted(nn.Module):
    """The trusted part: a linear layer, a bf16 parameter and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale.float()


class OtherTrusted(Trusted):
    """Same weights, other code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)


CODE = [Trusted, b"phalanx-test-enclave-v1"]


def trusted(seed: int = 0) -> Trusted:
    torch.manual_seed(seed)
    return Trusted()


@pytest.fixture()
def platform() -> SimulatedPlatform:
    return SimulatedPlatform()


@pytest.fixture()
def enclave(platform: SimulatedPlatform) -> SimulatedEnclave:
    e = SimulatedEnclave(platform)
    e.load(trusted(), code=CODE)
    return e


def attested(enclave: SimulatedEnclave, platform: SimulatedPlatform):  # noqa: ANN201
    nonce = new_nonce()
    report = enclave.attest(nonce)
    client = verify_report(report, vendor_key=platform.vendor_public,
                           expected_measurement=measure(CODE, trusted().state_dict()),
                           nonce=nonce)
    enclave.open_session(client.client_public)
    return client


# --- measurement -------------------------------------------------------------------------------


def test_measurement_is_stable_for_the_same_code_and_weights_on_any_platform() -> None:
    a, b = SimulatedEnclave(SimulatedPlatform()), SimulatedEnclave(SimulatedPlatform())
    assert a.load(trusted(), code=CODE) == b.load(trusted(), code=CODE)
    assert a.measurement == measure(CODE, trusted().state_dict())  # what a client computes
    assert len(a.measurement) == 32


def test_measurement_changes_when_a_single_weight_changes() -> None:
    module = trusted()
    before = measure(CODE, module.state_dict())
    with torch.no_grad():
        w = module.proj.weight
        w[1, 2] = torch.nextafter(w[1, 2], torch.tensor(2.0))  # one ulp
    assert measure(CODE, module.state_dict()) != before


def test_measurement_changes_when_the_code_changes() -> None:
    state = trusted().state_dict()
    base = measure(CODE, state)
    assert measure([OtherTrusted, CODE[1]], state) != base
    assert measure([Trusted, b"phalanx-test-enclave-v2"], state) != base
    assert measure([CODE[1], Trusted], state) != base  # order is part of the identity


def test_code_parts_are_length_framed_so_boundaries_cannot_shift() -> None:
    assert code_digest([b"ab", b"c"]) != code_digest([b"a", b"bc"])
    assert code_digest([b"abc"]) != code_digest([b"ab", b"c"])


def test_weights_digest_hashes_logical_values_of_non_contiguous_tensors() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert not t.t().is_contiguous()
    assert weights_digest({"w": t.t()}) == weights_digest({"w": t.t().contiguous()})
    assert weights_digest({"w": t.t()}) != weights_digest({"w": t})
    bf = torch.randn(5, 3).to(torch.bfloat16)
    assert weights_digest({"w": bf[:, 1]}) == weights_digest({"w": bf[:, 1].clone()})


def test_weights_digest_covers_dtype_shape_and_name() -> None:
    zeros = torch.zeros(4, dtype=torch.float32)
    base = weights_digest({"w": zeros})
    assert weights_digest({"w": torch.zeros(4, dtype=torch.int32)}) != base  # same raw bytes
    assert weights_digest({"w": zeros.reshape(2, 2)}) != base
    assert weights_digest({"v": zeros}) != base
    assert weights_digest({"a": zeros, "b": zeros.clone()}) == weights_digest(
        {"b": zeros.clone(), "a": zeros})  # insertion order does not matter


# --- attestation and session ---------------------------------------------------------------------


def test_happy_path_both_sides_hold_the_same_session_key(enclave, platform) -> None:
    client = attested(enclave, platform)
    x = torch.randn(2, 4)
    reply = client.session.decrypt(enclave.run_encrypted(client.session.encrypt({"x": x})))
    with torch.no_grad():
        expected = trusted()(x)
    assert torch.equal(reply["output"], expected)
    second = client.session.decrypt(enclave.run_encrypted(client.session.encrypt({"x": 2 * x})))
    assert torch.equal(second["output"], trusted()(2 * x).detach())
    assert enclave.cost.attestations == 1 and enclave.cost.runs == 2
    assert enclave.cost.session_bytes > 0 and enclave.cost.attest_s > 0


def test_host_cannot_replay_reflect_or_tamper_session_messages(enclave, platform) -> None:
    client = attested(enclave, platform)
    request = client.session.encrypt({"x": torch.randn(1, 4)})
    reply = enclave.run_encrypted(request)
    with pytest.raises(SealError, match="does not authenticate"):
        enclave.run_encrypted(request)  # replayed
    with pytest.raises(SealError, match="does not authenticate"):
        enclave.run_encrypted(reply)  # the enclave's own reply reflected back
    tampered = bytearray(client.session.encrypt({"x": torch.randn(1, 4)}))
    tampered[-20] ^= 1
    with pytest.raises(SealError, match="does not authenticate"):
        enclave.run_encrypted(bytes(tampered))
    assert client.session.decrypt(reply)["output"].shape == (1, 3)


def test_report_of_another_measurement_is_refused(platform) -> None:
    other = SimulatedEnclave(platform)
    other.load(trusted(seed=1), code=CODE)  # other initial weights, same code
    nonce = new_nonce()
    with pytest.raises(AttestationError, match="measurement"):
        verify_report(other.attest(nonce), vendor_key=platform.vendor_public,
                      expected_measurement=measure(CODE, trusted().state_dict()), nonce=nonce)


def test_report_signed_by_another_vendor_key_is_refused(platform) -> None:
    rogue = SimulatedEnclave(SimulatedPlatform())  # same build, another (unpinned) vendor
    rogue.load(trusted(), code=CODE)
    nonce = new_nonce()
    with pytest.raises(AttestationError, match="signature"):
        verify_report(rogue.attest(nonce), vendor_key=platform.vendor_public,
                      expected_measurement=rogue.measurement, nonce=nonce)


def test_every_flipped_byte_of_a_report_is_refused(enclave, platform) -> None:
    nonce = new_nonce()
    report = enclave.attest(nonce)
    verify_report(report, vendor_key=platform.vendor_public,
                  expected_measurement=enclave.measurement, nonce=nonce)  # the original passes
    for i in range(REPORT_SIZE):
        bad = bytearray(report)
        bad[i] ^= 0x01
        expected = "magic" if i < 4 else "version" if i < 6 else "signature"
        with pytest.raises(AttestationError, match=expected):
            verify_report(bytes(bad), vendor_key=platform.vendor_public,
                          expected_measurement=enclave.measurement, nonce=nonce)


@pytest.mark.parametrize("cut", ["empty", "one_short", "one_long", "doubled"])
def test_truncated_or_over_long_report_is_refused_before_parsing(enclave, platform, cut) -> None:
    nonce = new_nonce()
    report = enclave.attest(nonce)
    data = {"empty": b"", "one_short": report[:-1], "one_long": report + b"\0",
            "doubled": report + report}[cut]
    with pytest.raises(AttestationError, match=f"exactly {REPORT_SIZE} bytes"):
        verify_report(data, vendor_key=platform.vendor_public,
                      expected_measurement=enclave.measurement, nonce=nonce)


def test_replayed_report_with_an_old_nonce_is_refused(enclave, platform) -> None:
    old_nonce = new_nonce()
    old_report = enclave.attest(old_nonce)  # genuine, properly signed, but stale
    with pytest.raises(AttestationError, match="another nonce"):
        verify_report(old_report, vendor_key=platform.vendor_public,
                      expected_measurement=enclave.measurement, nonce=new_nonce())


def test_report_whose_bound_public_key_was_swapped_is_refused(enclave, platform) -> None:
    nonce = new_nonce()
    report = bytearray(enclave.attest(nonce))
    start = REPORT_SIZE - SIGNATURE_SIZE - PUBLIC_KEY_SIZE
    host_key = public_bytes(x25519.X25519PrivateKey.generate().public_key())
    report[start:start + PUBLIC_KEY_SIZE] = host_key
    with pytest.raises(AttestationError, match="signature"):
        verify_report(bytes(report), vendor_key=platform.vendor_public,
                      expected_measurement=enclave.measurement, nonce=nonce)


def test_session_key_is_bound_to_the_whole_transcript() -> None:
    enclave_key, client_key = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    e_pub, c_pub = public_bytes(enclave_key.public_key()), public_bytes(client_key.public_key())
    fields = {"nonce": b"n" * 32, "measurement": b"m" * 32, "enclave_public": e_pub,
              "client_public": c_pub}
    key = derive_session_key(client_key, e_pub, **fields)
    assert derive_session_key(enclave_key, c_pub, **fields) == key  # both sides agree
    for name in fields:  # same shared secret, any other transcript field: another key
        changed = {**fields, name: bytes(32) if name != "nonce" else b"o" * 32}
        assert derive_session_key(client_key, e_pub, **changed) != key, name


def test_host_substituting_the_client_key_gets_no_usable_session(enclave, platform) -> None:
    nonce = new_nonce()
    client = verify_report(enclave.attest(nonce), vendor_key=platform.vendor_public,
                           expected_measurement=enclave.measurement, nonce=nonce)
    host = x25519.X25519PrivateKey.generate()
    enclave.open_session(public_bytes(host.public_key()))  # the host's key, not the client's
    with pytest.raises(SealError, match="does not authenticate"):
        enclave.run_encrypted(client.session.encrypt({"x": torch.randn(1, 4)}))


def test_each_attestation_opens_one_session_and_low_order_keys_are_refused(enclave,
                                                                         platform) -> None:
    client = attested(enclave, platform)
    with pytest.raises(EnclaveError, match="call attest first"):
        enclave.open_session(client.client_public)
    enclave.attest(new_nonce())
    with pytest.raises(AttestationError, match="invalid"):
        enclave.open_session(bytes(PUBLIC_KEY_SIZE))  # the all-zero, low-order point


def test_loading_another_module_ends_the_session_of_the_previous_one(enclave, platform) -> None:
    client = attested(enclave, platform)
    request = client.session.encrypt({"x": torch.randn(1, 4)})
    enclave.load(trusted(seed=1), code=CODE)  # the host swaps the trusted part
    with pytest.raises(EnclaveError, match="no session"):
        enclave.run_encrypted(request)


def test_calls_out_of_order_or_with_bad_nonces_name_the_problem(platform) -> None:
    e = SimulatedEnclave(platform)
    with pytest.raises(EnclaveError, match="call load first"):
        e.attest(new_nonce())
    e.load(trusted(), code=CODE)
    with pytest.raises(EnclaveError, match="32 random bytes"):
        e.attest(b"short nonce")
    with pytest.raises(EnclaveError, match="no session"):
        e.run_encrypted(b"x" * 64)
    with pytest.raises(AttestationError, match="client nonce"):
        verify_report(e.attest(new_nonce()), vendor_key=platform.vendor_public,
                      expected_measurement=e.measurement, nonce=b"\0" * 8)
    assert issubclass(AttestationError, PhalanxError) and issubclass(SealError, PhalanxError)


# --- sealing -------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)


def test_sealing_round_trip_is_bitwise_exact(enclave) -> None:
    state = {
        "f32": torch.tensor([1.5, float("nan"), -0.0, float("inf")]),
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "i64": torch.tensor([[-(2**62), 3], [0, 2**40]], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 5),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    blob = enclave.seal(label="lora", state=state)
    out = enclave.unseal(blob, label="lora")
    assert list(out) == list(state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(_bits(out[name]), _bits(t)), name
    assert enclave.cost.seals == 1 and enclave.cost.sealed_bytes == len(blob)
    assert enclave.cost.unseals == 1 and enclave.cost.seal_s > 0


def test_module_state_is_sealed_by_default_and_reopens_in_a_fresh_same_build(enclave,
                                                                             platform) -> None:
    blob = enclave.seal(label="ckpt")
    restarted = SimulatedEnclave(platform)
    restarted.load(trusted(), code=CODE)
    out = restarted.unseal(blob, label="ckpt")
    assert set(out) == set(trusted().state_dict())
    assert torch.equal(out["proj.weight"], trusted().proj.weight.detach())


def test_tampered_sealed_blob_is_refused(enclave) -> None:
    blob = enclave.seal(label="lora")
    for i in (6, 10, 17, len(blob) // 2, len(blob) - 17, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x80
        with pytest.raises(SealError, match="does not authenticate"):
            enclave.unseal(bytes(bad), label="lora")
    bad = bytearray(blob)
    bad[0] ^= 1
    with pytest.raises(SealError, match="not a version-1 sealed blob"):
        enclave.unseal(bytes(bad), label="lora")


@pytest.mark.parametrize("keep", [0, 3, 20, -1])
def test_truncated_sealed_blob_is_refused(enclave, keep) -> None:
    blob = enclave.seal(label="lora")
    with pytest.raises(SealError, match="truncated|does not authenticate"):
        enclave.unseal(blob[:keep], label="lora")


def test_blob_sealed_by_another_measurement_platform_or_label_is_refused(enclave,
                                                                        platform) -> None:
    blob = enclave.seal(label="lora")
    other_build = SimulatedEnclave(platform)
    other_build.load(trusted(), code=[OtherTrusted, CODE[1]])
    other_machine = SimulatedEnclave(SimulatedPlatform())
    other_machine.load(trusted(), code=CODE)
    for e, label in ((other_build, "lora"), (other_machine, "lora"), (enclave, "other")):
        with pytest.raises(SealError, match="does not authenticate"):
            e.unseal(blob, label=label)


def test_sealing_key_depends_on_the_measurement_and_the_platform_secret() -> None:
    platform = SimulatedPlatform(secret=b"s" * 32)
    key = platform.sealing_key(b"m" * 32)
    assert SimulatedPlatform(secret=b"s" * 32).sealing_key(b"m" * 32) == key  # reproducible
    assert platform.sealing_key(b"M" * 32) != key
    assert SimulatedPlatform(secret=b"t" * 32).sealing_key(b"m" * 32) != key


def _packed(entries: object, payload: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    header = json.dumps({"tensors": entries}).encode() if raw_header is None else raw_header
    return struct.pack("<4sBI", PACK_MAGIC, PACK_VERSION, len(header)) + header + payload


def test_sealed_blob_declaring_a_huge_shape_is_refused_without_allocating(
        enclave, monkeypatch) -> None:
    huge = _packed([{"name": "w", "dtype": "float32", "shape": [2**31, 2**31]}], b"\0" * 16)
    fits = _packed([{"name": "w", "dtype": "float32", "shape": [2**28]}], b"\0" * 16)  # 1 GiB
    blobs = []
    for plaintext in (huge, fits):  # an authentic blob, as a compromised same build could seal
        monkeypatch.setattr(envelope, "pack_tensors", lambda _t, p=plaintext: p)
        blobs.append(enclave.seal(label="lora", state={}))
    monkeypatch.undo()
    tracemalloc.start()
    try:
        with pytest.raises(SealError, match="exceeds"):
            enclave.unseal(blobs[0], label="lora")
        with pytest.raises(SealError, match="declare 1073741824 bytes but 16 follow"):
            enclave.unseal(blobs[1], label="lora")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


F32 = {"name": "w", "dtype": "float32", "shape": [2]}


@pytest.mark.parametrize(("data", "reason"), [
    (_packed([F32], b"\0" * 8)[:-1], "declare 8 bytes but 7 follow"),
    (_packed([F32], b"\0" * 9), "declare 8 bytes but 9 follow"),
    (_packed([{**F32, "dtype": "complex64"}], b"\0" * 16), "not in"),
    (_packed([{**F32, "dtype": "object"}], b"\0" * 8), "not in"),
    (_packed([{**F32, "shape": [-2]}]), "needs ints"),
    (_packed([{**F32, "shape": [True, 2]}], b"\0" * 8), "needs ints"),
    (_packed([{**F32, "shape": [2.0]}], b"\0" * 8), "needs ints"),
    (_packed([{**F32, "shape": [1] * 9}], b"\0" * 4), "at most 8"),
    (_packed([{**F32, "shape": [0, 2**31, 2**31]}]), "exceeds"),
    (_packed([F32, F32], b"\0" * 16), "twice"),
    (_packed([{**F32, "extra": 1}], b"\0" * 8), "exactly"),
    (_packed(None, raw_header=b'{"tensors": [], "tensors": []}'), "repeats a key"),
    (_packed(None, raw_header=b"\xff\xfe"), "not valid UTF-8 JSON"),
    (_packed(None, raw_header=b"[" * 5000 + b"]" * 5000), "not valid UTF-8 JSON"),
    (_packed({"w": F32}), "'tensors' must be a list"),
    (_packed([{**F32, "dtype": "bool", "shape": [2]}], b"\x00\x02"), "other than 0 and 1"),
    (struct.pack("<4sBI", PACK_MAGIC, PACK_VERSION, 1000) + b"{}", "exceeds the limit or"),
    (b"XXXX" + _packed([])[4:], "bad magic"),
    (b"PXT", "shorter than its prefix"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_tensor_layout_is_refused_with_the_reason(data, reason) -> None:
    with pytest.raises(SealError, match=reason):
        unpack_tensors(data)


def test_unpacked_tensors_own_their_memory() -> None:
    data = bytearray(_packed([F32], struct.pack("<2f", 1.0, 2.0)))
    out = unpack_tensors(data)
    data[-8:] = b"\0" * 8  # the caller reusing its buffer must not change the tensors
    assert out["w"].tolist() == [1.0, 2.0]
