"""A hostile network, declared: faults on the links between stages, for tests and experiments.

``faults.links = ["drop 5% 1->2", "delay 200ms 2->3", "replay 1->2 at step 4",
"reorder 1->2", "corrupt 1% 2->3"]`` wraps the sending end of each named link:

- ``drop P% a->b``: each frame is lost with probability P (a lost frame surfaces as a bounded
  timeout that names the silent stage);
- ``delay Nms a->b``: each frame leaves N ms late;
- ``replay a->b at step K``: the first frame of step K is followed by a copy of the frame
  before it, sequence number and all (the receiver refuses it as a replay, logs it and counts
  it against the sender; the run goes on);
- ``reorder a->b``: every pair of consecutive frames swaps places after sequencing, as a
  network would (refused as out of order);
- ``corrupt P% a->b``: with probability P one bit of the frame's payload flips in transit.
  Only a transport with integrity refuses it on the wire (the secure transport's TLS records;
  tested with a man in the middle); over the simulator's links and gloo, which have none, it
  arrives, and it is the defense's to catch.

Draws come from a generator seeded by ``faults.seed`` and the link, so a faulty run repeats.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field, replace

import torch

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.errors import ConfigError
from phalanx.wire import Frame

_SPEC = re.compile(
    r"^(?P<what>drop|delay|replay|reorder|corrupt)"
    r"(?:\s+(?P<amount>\d+(?:\.\d+)?)(?P<unit>%|ms))?"
    r"\s+(?P<src>\d+)\s*->\s*(?P<dst>\d+)"
    r"(?:\s+at\s+step\s+(?P<step>\d+))?$")
_NEEDS = {"drop": "%", "corrupt": "%", "delay": "ms", "replay": None, "reorder": None}


@dataclass(frozen=True)
class Fault:
    """One declared fault on the link ``src -> dst``."""

    what: str
    src: int
    dst: int
    rate: float = 0.0  # drop, corrupt: probability per frame
    delay_s: float = 0.0
    step: int = -1  # replay: at this step


def parse_fault(text: str, stages: int) -> Fault:
    """A fault from its declaration; :class:`ConfigError` naming the syntax if it is wrong."""
    m = _SPEC.match(text.strip())
    if m is None:
        raise ConfigError(f"faults.links entry {text!r} is not a fault: write e.g. "
                          '"drop 5% 1->2", "delay 200ms 2->3", "replay 1->2 at step 4", '
                          '"reorder 1->2" or "corrupt 1% 2->3"')
    what, unit, amount = m["what"], m["unit"], m["amount"]
    src, dst = int(m["src"]), int(m["dst"])
    if unit != _NEEDS[what] or (what == "replay") != (m["step"] is not None):
        raise ConfigError(f"faults.links entry {text!r}: {what} takes "
                          + {"%": "a percentage", "ms": "a delay in ms"}.get(
                              _NEEDS[what] or "", "no amount")
                          + (" and 'at step K'" if what == "replay" else ""))
    if not (0 <= src < stages and 0 <= dst < stages and src != dst):
        raise ConfigError(f"faults.links entry {text!r}: no link {src}->{dst} among "
                          f"{stages} stages")
    value = float(amount) if amount is not None else 0.0
    if unit == "%" and not 0 <= value <= 100:
        raise ConfigError(f"faults.links entry {text!r}: a percentage is 0 to 100")
    return Fault(what, src, dst, rate=value / 100 if unit == "%" else 0.0,
                 delay_s=value / 1000 if unit == "ms" else 0.0,
                 step=int(m["step"]) if m["step"] is not None else -1)


@dataclass(kw_only=True)
class FaultConfig:
    """Declared faults of the network (none by default)."""

    links: list[str] = field(default_factory=list)
    seed: int = 0

    def parsed(self, stages: int) -> list[Fault]:
        return [parse_fault(t, stages) for t in self.links]


class FaultyLink(ChannelWrapper):
    """The sending end of one link, with that link's faults."""

    def __init__(self, inner: Channel, faults: list[Fault], seed: int) -> None:
        super().__init__(inner)
        self.raw = inner
        while isinstance(self.raw, ChannelWrapper):  # sequence numbers live in the transport
            self.raw = self.raw.inner
        self.faults = faults
        self.rng = random.Random(seed * 1_000_003 + inner.me * 1009 + inner.peer)
        self._last: Frame | None = None
        self._held: Frame | None = None
        self._replayed = False

    def send(self, frame: Frame) -> None:
        for f in self.faults:
            if f.what == "drop" and self.rng.random() < f.rate:
                return
            if f.what == "delay":
                time.sleep(f.delay_s)
        stamped = self._stamp(frame)
        for f in self.faults:
            if f.what == "corrupt" and self.rng.random() < f.rate:
                stamped = self._flip(stamped)
        self._put(stamped)
        for f in self.faults:
            if f.what == "replay" and not self._replayed and frame.step >= f.step \
                    and self._last is not None:
                self._replayed = True
                self.raw._transmit(self._last)  # the copy keeps its old sequence number
        self._last = stamped

    def _stamp(self, frame: Frame) -> Frame:
        """Addresses and the next sequence number, as the link would give them."""
        inner = self.raw
        frame = replace(frame, src=inner.me, dst=inner.peer)
        inner._send_seq += 1
        frame.seq = inner._send_seq
        return frame

    def _put(self, frame: Frame) -> None:
        if any(f.what == "reorder" for f in self.faults):
            if self._held is None:
                self._held = frame
                return
            held, self._held = self._held, None
            self._transmit_raw(frame)
            self._transmit_raw(held)
            return
        self._transmit_raw(frame)

    def _transmit_raw(self, frame: Frame) -> None:
        self.raw.bytes_sent += self.raw._transmit(frame)

    def _flip(self, frame: Frame) -> Frame:
        """One bit of the payload flipped (the header is the transport's to protect)."""
        t = frame.tensor.detach().clone().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() and t.dtype != torch.bool else None
        if raw is None:
            return frame
        i = self.rng.randrange(raw.numel())
        raw[i] ^= 1 << self.rng.randrange(8)
        return replace(frame, tensor=t)

    def flush(self) -> None:
        if self._held is not None:  # a frame held for reordering leaves at the next flush
            held, self._held = self._held, None
            self._transmit_raw(held)
        self.inner.flush()


def with_faults(channels: dict[int, Channel], me: int, faults: list[Fault], seed: int
                ) -> dict[int, Channel]:
    """This stage's links, the faulty ones wrapped."""
    out = dict(channels)
    for peer in channels:
        mine = [f for f in faults if f.src == me and f.dst == peer]
        if mine:
            out[peer] = FaultyLink(channels[peer], mine, seed)
    return out
