"""The largest frame of each kind a run can send, derived from its settings: what receivers
refuse beyond, from the header alone, before allocating anything."""

from __future__ import annotations

from phalanx.wire import Kind, Limits

CONTROL_BYTES = 64 * 1024  # norms, reports, verdicts, control values: a few hundred bytes


def run_limits(*, micro_rows: int, seq_len: int, hidden: int, itemsize: int,
               tied_bytes: int, norm_bytes: int = 0, overhead: int = 0) -> Limits:
    """Per-kind limits of a pipeline whose micro-batches are ``micro_rows`` x ``seq_len``
    tokens, ``hidden`` wide in elements of ``itemsize`` bytes, with ``tied_bytes`` of tied
    weights between the first and the last stage (0 when nothing is tied) and ``norm_bytes``
    in a stage's norm frame (its overseer's report; at least :data:`CONTROL_BYTES`);
    ``overhead`` bytes more per frame where a link wraps each payload (an encrypted session)."""
    hidden_state = micro_rows * seq_len * hidden * itemsize
    per_kind = {
        Kind.ACTIVATION: hidden_state, Kind.GRADIENT: hidden_state, Kind.JUMP: hidden_state,
        Kind.JUMP_GRAD: hidden_state, Kind.LABELS: micro_rows * seq_len * 8,
        Kind.TIED_GRAD: tied_bytes, Kind.TIED_WEIGHT: tied_bytes,
        Kind.NORM: max(CONTROL_BYTES, norm_bytes), Kind.NORM_TOTAL: CONTROL_BYTES,
        Kind.REPORT: CONTROL_BYTES,
        Kind.CONTROL: CONTROL_BYTES, Kind.VERDICT: CONTROL_BYTES, Kind.ATTEST: CONTROL_BYTES,
        Kind.SHAPE: CONTROL_BYTES,
    }
    return Limits(per_kind={k: v + overhead if v else v for k, v in per_kind.items()})
