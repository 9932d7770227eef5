"""StageWorker: executes one stage's actions over channels; the same code in both runtimes.

The worker holds the stage module, its optimizer and its links. Frames that arrive before they
are needed wait in its :class:`~phalanx.pipeline.stash.Stash`, so the order of arrivals never
matters.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from phalanx.comm import Channel, ChannelTimeout
from phalanx.errors import ConfigError
from phalanx.models.stages import StageModule, lm_loss
from phalanx.pipeline.gate import VerdictGate
from phalanx.pipeline.optim import StageOptimizer
from phalanx.pipeline.schedule import Action, Op
from phalanx.pipeline.stash import TAGS, Stash, describe
from phalanx.pipeline.stats import IterationResult, StageStats
from phalanx.pipeline.verdict import Coordinator, Oversight, Verdict
from phalanx.wire import Frame, FrameError, Kind

log = logging.getLogger(__name__)

class StageWorker:
    """Runs the actions of stage ``stage.index`` of ``stage.num_stages``."""

    def __init__(
        self, stage: StageModule, channels: dict[int, Channel],
        optimizer: StageOptimizer | None = None, *, timeout: float | None = 300.0,
        hidden_size: int | None = None, dtype: torch.dtype = torch.float32,
        frozen_front: int = 0,
    ) -> None:
        self.stage = stage
        self.me = stage.index
        if self.me < frozen_front and any(p.requires_grad for p in stage.parameters()):
            raise ConfigError(f"stage {self.me} is one of the {frozen_front} frozen front stages "
                              "but has parameters to train")
        self.frozen_front = frozen_front  # stages before it train nothing: no gradient to them
        self.n = stage.num_stages
        self.last = self.n - 1
        self.channels = channels
        self.optimizer = optimizer
        self.timeout = timeout
        self.hidden_size = hidden_size or int(stage.config.hidden_size if hasattr(
            stage.config, "hidden_size") else stage.config.n_embd)
        self.dtype = dtype
        self.device = next(stage.parameters()).device
        self.tied = sorted(stage.tied.items(), key=lambda kv: kv[1])  # (local, canonical)
        self._params = dict(stage.named_parameters())
        self._stash = Stash(self.me, self._reject)
        self.attempt = -1  # iterations begun, less one; a frame's ``flags`` carry it (mod 128:
        # the low 7 bits; the high bit means nothing), so what was sent for a discarded attempt
        # is never taken for its redo
        self.rejected: dict[int, int] = {}  # frames refused, by sender: evidence against it
        self.step = 0
        self.micro = 1
        self.train = True
        self.inputs: list[torch.Tensor] = []
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._norm_sq = 0.0
        self.global_norm = float("nan")
        self.stats = StageStats()
        self.result: IterationResult | None = None
        # Oversight seams (an overseer plugs in here; the engine only carries the numbers):
        self.report: Callable[[], torch.Tensor] | None = None  # this stage's report
        self.report_size = 0  # its length, the same on every stage
        self.coordinator: Coordinator | None = None  # stage 0 only
        self.verdict_hooks: list[Callable[[Verdict], None]] = []
        # the optimizer, gated by the verdict; an overseer may say what a verdict freezes
        self.gate = VerdictGate(optimizer, stage, self.me) if optimizer is not None else None
        self.norm_excluded: set[int] = set()  # ids of parameters the global norm leaves out
        self.overseen = False  # a malformed gradient: refused and zeros used, not an error
        self.verdict = Verdict()
        self.current = (0, -1)  # (step, micro-batch) of the forward being computed
        self._rows: dict[int, tuple[int, ...]] = {}  # (batch, seq) of micro-batches, by labels
        self._reports: torch.Tensor | None = None
        self._refused: torch.Tensor | None = None
        self._rejected_before: dict[int, int] = {}

    # -- iteration lifecycle --------------------------------------------------------------------
    def begin(
        self, step: int, micro: int, inputs: list[torch.Tensor] | None = None, train: bool = True
    ) -> None:
        """Start iteration ``step`` of ``micro`` micro-batches; stage 0 gets their token ids."""
        if self.me == 0 and len(inputs or []) != micro:
            raise ValueError(f"stage 0 needs the {micro} micro-batches of the iteration")
        self.step, self.micro, self.train = step, micro, train
        self.inputs = [x.to(self.device) for x in inputs or []]
        self._saved.clear()
        self._rows.clear()
        self.stats = StageStats()
        self.result = None
        self.global_norm = float("nan")
        self.verdict = Verdict()
        self._rejected_before = dict(self.rejected)
        self.stage.train(train)
        self.attempt += 1
        self._stash.begin(step, self.tag)

    def run(self, actions: list[Action]) -> None:
        """Execute ``actions`` in order, blocking on each frame they need (distributed runtime)."""
        for action in actions:
            self.execute(action)
        for ch in self.channels.values():
            ch.flush()

    # -- readiness (simulator) --------------------------------------------------------------------
    def needs(self, action: Action) -> list[tuple[int, Kind, int]]:
        """The frames ``action`` waits for, as (peer, kind, micro) keys."""
        op, m = action.op, action.micro
        if op is Op.FORWARD:
            keys = [] if self.me == 0 else [(self.me - 1, Kind.ACTIVATION, m)]
            if self.me == self.last and self.me != 0:
                keys.append((0, Kind.LABELS, m))
            return keys
        if op is Op.BACKWARD:
            return [] if self.me == self.last else [(self.me + 1, Kind.GRADIENT, m)]
        if op is Op.RECV_TIED:
            return [(self.last, Kind.TIED_GRAD, 0)]
        if op is Op.RECV_WEIGHTS:
            return [(0, Kind.TIED_WEIGHT, 0)]
        if op is Op.GATHER_NORM:
            return [(p, Kind.NORM, 0) for p in range(1, self.n)]
        if op is Op.RECV_NORM:
            return [(0, Kind.NORM_TOTAL, 0)]
        if op is Op.GATHER_REPORT:
            return [(p, Kind.REPORT, 0) for p in range(1, self.n)]
        return []

    def ready(self, action: Action) -> bool:
        """Whether every frame ``action`` needs has arrived (never blocks)."""
        keys = self.needs(action)
        for peer in sorted({k[0] for k in keys}):  # the data owner's labels first
            while True:
                try:
                    frame = self.channels[peer].poll()
                except FrameError as exc:
                    self._reject(peer, exc)
                    continue
                if frame is None:
                    break
                self._file(frame)
        return all((*k, self.tag) in self._stash for k in keys)

    # -- actions -------------------------------------------------------------------------------
    def execute(self, action: Action) -> None:
        """Perform one action."""
        handler = getattr(self, "_do_" + action.op.name.lower())
        handler(action.micro)

    def _do_forward(self, m: int) -> None:
        labels = None
        if self.me == self.last:  # first: what they say of the micro-batch's shape is known
            labels = self.inputs[m] if self.me == 0 else self._check_labels(
                self._take(0, Kind.LABELS, m).tensor)
            self._rows[m] = tuple(labels.shape)
        if self.me == 0:
            x = self.inputs[m]
        else:
            x = self._check_activation(self._take(self.me - 1, Kind.ACTIVATION, m).tensor)
            if self.train and self.me > self.frozen_front:  # its input gradient is sent back
                x.requires_grad_()
        if self.me == 0 and self.me != self.last:
            self._send(self.last, Kind.LABELS, m, self.inputs[m])
        t0 = time.perf_counter()
        self.current = (self.step, m)
        with torch.set_grad_enabled(self.train):
            out = self.stage(x)
            if labels is not None:
                if labels.shape != out.shape[:2]:
                    raise FrameError(f"labels of shape {tuple(labels.shape)} do not match the "
                                     f"micro-batch {tuple(out.shape[:2])}")
                loss = lm_loss(out, labels)
                self.stats.loss_sum += float(loss.detach())
                self.stats.loss_count += 1
                self.stats.tokens += labels.numel()
                out = loss
        self.stats.compute_s += time.perf_counter() - t0
        if self.me != self.last:
            self._send(self.me + 1, Kind.ACTIVATION, m, out.detach())
        if self.train and self.me >= self.frozen_front:
            self._saved[m] = (x, out)

    def _do_backward(self, m: int) -> None:
        x, out = self._saved.pop(m)
        if self.me == self.last:
            grad = None
            out = out / self.micro  # the iteration's loss is the mean over micro-batches
        else:
            grad = self._take(self.me + 1, Kind.GRADIENT, m).tensor
            if grad.shape != out.shape or grad.dtype != out.dtype:
                exc = FrameError(
                    f"stage {self.me + 1} sent a gradient of {tuple(grad.shape)} {grad.dtype}, "
                    f"expected {tuple(out.shape)} {out.dtype}")
                if not self.overseen:
                    raise exc
                self._reject(self.me + 1, exc)  # an overseer discards the attempt
                grad = torch.zeros_like(out)
        t0 = time.perf_counter()
        if out.requires_grad:  # else nothing before it trains (a data owner's frozen layers)
            torch.autograd.backward(out, grad)
        self.stats.compute_s += time.perf_counter() - t0
        if self.me > self.frozen_front:
            self._send(self.me - 1, Kind.GRADIENT, m, x.grad)

    def _do_send_tied(self, _: int) -> None:
        """Last stage: hand the replica's gradient to stage 0, the owner."""
        self._send(0, Kind.TIED_GRAD, 0, self._tied_grads())
        for local, _ in self.tied:
            self._params[local].grad = None  # the replica is not stepped here

    def _do_recv_tied(self, _: int) -> None:
        """Stage 0: g_tied = g_embedding + g_head, exactly as in the unsplit model."""
        other = self._expect(self._take(self.last, Kind.TIED_GRAD, 0).tensor, self._tied_grads(),
                             "tied gradient")
        for p, g in zip(self._tied_params(), self._split(other), strict=True):
            p.grad.add_(g)  # in place: no second 113 MB buffer for SmolLM2's embedding

    def _do_send_weights(self, _: int) -> None:
        """Stage 0, after its step: the updated tied weights, for the next iteration's replica."""
        w = self._flat(self._tied_params())
        self.channels[self.last].send(Frame(kind=Kind.TIED_WEIGHT, step=self.step + 1, micro=0,
                                            src=self.me, dst=self.last, tensor=w,
                                            flags=(self.tag + 1) % TAGS))  # for the next

    def _do_recv_weights(self, _: int) -> None:
        """Last stage: overwrite the replica with stage 0's updated weights."""
        mine = self._flat(self._tied_params())
        new = self._expect(self._take(0, Kind.TIED_WEIGHT, 0).tensor, mine, "tied weight")
        with torch.no_grad():
            for p, w in zip(self._tied_params(), self._split(new), strict=True):
                p.copy_(w)

    def _my_report(self) -> torch.Tensor:
        if self.report is None:
            return torch.zeros(self.report_size, dtype=torch.float64)
        return self.report().to(torch.float64).reshape(self.report_size)

    def _my_refusals(self) -> torch.Tensor:
        """Frames this stage refused in this iteration, by sender."""
        out = torch.zeros(self.n, dtype=torch.float64)
        for peer, count in self.rejected.items():
            out[peer] = count - self._rejected_before.get(peer, 0)
        return out

    def _do_send_norm(self, _: int) -> None:
        """Squared norm of this stage's gradients, the frames it refused (by sender) this
        iteration and its overseer's report."""
        self._send(0, Kind.NORM, 0, torch.cat([torch.tensor([self._local_norm_sq()],
                                                            dtype=torch.float64),
                                               self._my_refusals(), self._my_report()]))

    def _gathered(self, p: int, t: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Stage p's (squared norm, refusals, report); a malformed frame or a norm that is not a
        finite non-negative number gives a NaN norm (the caller marks p invalid)."""
        size = 1 + self.n + self.report_size
        empty = torch.zeros(self.n, dtype=torch.float64), torch.zeros(self.report_size,
                                                                      dtype=torch.float64)
        if t.shape != (size,) or t.dtype != torch.float64:
            log.warning("stage %d sent a norm frame of %s %s, expected (%d,) float64", p,
                        tuple(t.shape), t.dtype, size)
            return float("nan"), *empty
        norm = float(t[0])
        if not (math.isfinite(norm) and norm >= 0):
            # a squared norm is never negative, and one that is would turn clipping off
            log.warning("stage %d sent a squared gradient norm of %s", p, norm)
            norm = float("nan")
        refused = t[1:self.n + 1]
        refused = torch.where(torch.isfinite(refused) & (refused > 0), refused.round(), 0.0)
        return norm, refused, t[self.n + 1:].clone()

    def _do_gather_norm(self, _: int) -> None:
        """Stage 0: collect norms, refusals and reports, let the coordinator decide, send the
        total and the verdict back."""
        norms = [self._local_norm_sq()]
        reports = torch.zeros(self.n, self.report_size, dtype=torch.float64)
        refused = torch.zeros(self.n, self.n, dtype=torch.float64)
        reports[0], refused[0] = self._my_report(), self._my_refusals()
        for p in range(1, self.n):
            norm, refused[p], reports[p] = self._gathered(p, self._take(p, Kind.NORM, 0).tensor)
            norms.append(norm)
        verdict = Verdict()
        if self.coordinator is not None:
            invalid = frozenset(p for p, v in enumerate(norms) if math.isnan(v))
            verdict = self.coordinator.decide(Oversight(
                step=self.step, train=self.train, norms=norms, invalid=invalid,
                reports=reports, refused=refused, tag=self.tag))
        self._reports, self._refused = reports, refused
        # a NaN (a real overflow, or an invalid report) makes every stage skip this update
        total = verdict.norm_sq
        if total is None:
            total = sum(v for s, v in enumerate(norms) if s not in verdict.frozen)
        self.global_norm = math.sqrt(total) if total >= 0 else float("nan")
        out = torch.cat([torch.tensor([total], dtype=torch.float64), verdict.encode(self.n)])
        for p in range(1, self.n):
            self._send(p, Kind.NORM_TOTAL, 0, out)
        self._adopt(verdict)

    def _do_recv_norm(self, _: int) -> None:
        t = self._take(0, Kind.NORM_TOTAL, 0).tensor
        if t.dim() != 1 or t.numel() < 1 or t.dtype != torch.float64:
            raise FrameError(f"a global norm frame has shape {tuple(t.shape)} {t.dtype}, "
                             "expected a float64 vector")
        self.global_norm = math.sqrt(max(float(t[0]), 0.0))
        self._adopt(Verdict.decode(t[1:], self.n))

    def _adopt(self, verdict: Verdict) -> None:
        self.verdict = verdict
        for hook in self.verdict_hooks:
            hook(verdict)

    def _do_step(self, _: int) -> None:
        if self.gate is None:
            raise RuntimeError(f"stage {self.me} has no optimizer to step")
        self.gate.step(self.verdict, self.global_norm)

    def _do_send_report(self, _: int) -> None:
        self._send(0, Kind.REPORT, 0, self.stats.as_tensor())

    def _do_gather_report(self, _: int) -> None:
        stats = [self.stats]
        for p in range(1, self.n):
            try:
                stats.append(StageStats.from_tensor(self._take(p, Kind.REPORT, 0).tensor))
            except FrameError as exc:  # a stage's own statistics: logged, never believed
                self._reject(p, exc)
                stats.append(StageStats())
        self.result = IterationResult(stats=stats, grad_norm=self.global_norm,
                                      reports=self._reports, verdict=self.verdict,
                                      refused=self._refused)

    # -- control messages (between iterations) ---------------------------------------------------
    def send_control(self, peer: int, tag: int, tensor: torch.Tensor) -> None:
        """Send a control tensor; ``tag`` pairs it with the receiver's :meth:`take_control`."""
        self._send(peer, Kind.CONTROL, tag, tensor)

    def take_control(self, peer: int, tag: int) -> torch.Tensor:
        """The control tensor ``peer`` sent with ``tag``."""
        return self._take(peer, Kind.CONTROL, tag).tensor

    def rows(self, m: int) -> tuple[int, ...] | None:
        """(batch, seq) of micro-batch ``m`` where this stage knows it from the labels (the
        last stage: the data owner's), else ``None``."""
        if self.me != self.last:
            return None
        if m not in self._rows:
            frame = self._stash.get((0, Kind.LABELS, m, self.tag))
            return tuple(frame.tensor.shape) if frame is not None else None
        return self._rows[m]

    # -- helpers ---------------------------------------------------------------------------------
    def _tied_params(self) -> list[torch.nn.Parameter]:
        return [self._params[local] for local, _ in self.tied]

    def _tied_grads(self) -> torch.Tensor:
        grads = []
        for p in self._tied_params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        return grads[0] if len(grads) == 1 else torch.cat(grads)  # one tied matrix: no copy

    @staticmethod
    def _flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The parameters as one flat tensor: a view when there is one (no 113 MB copy; the
        send completes at the end of the iteration, before the next step changes it)."""
        if len(params) == 1:
            return params[0].detach().reshape(-1)
        return torch.cat([p.detach().reshape(-1) for p in params])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` cut into tensors shaped like the tied parameters."""
        params = self._tied_params()
        parts = flat.split([p.numel() for p in params])
        return [t.view_as(p) for t, p in zip(parts, params, strict=True)]

    @staticmethod
    def _expect(got: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
        if got.shape != like.shape or got.dtype != like.dtype:
            raise FrameError(f"{what} of {tuple(got.shape)} {got.dtype}, expected "
                             f"{tuple(like.shape)} {like.dtype}")
        return got

    def _local_norm_sq(self) -> float:
        """Squared norm of this stage's gradients; a tied copy counts once (on stage 0).

        Per-tensor norms in the gradients' dtype (as ``clip_grad_norm_``), summed in float64."""
        skip = {id(self._params[local]) for local, _ in self.tied} if self.me != 0 else set()
        skip |= self.norm_excluded
        grads = [p.grad for p in self.stage.parameters()
                 if p.grad is not None and id(p) not in skip]
        if not grads:
            return 0.0
        norms = torch.stack(torch._foreach_norm(grads)).double()
        return float(norms.pow(2).sum())

    @property
    def tag(self) -> int:
        """This attempt's number, as the ``flags`` of what it sends carry it."""
        return self.attempt % TAGS

    def _send(self, peer: int, kind: Kind, micro: int, tensor: torch.Tensor) -> None:
        self.channels[peer].send(Frame(kind=kind, step=self.step, micro=micro, src=self.me,
                                       dst=peer, tensor=tensor, flags=self.tag))

    def _reject(self, peer: int, exc: Exception) -> None:
        """A frame the link refused (malformed, replayed, out of order): dropped, logged and
        counted against its sender; the link and this stage go on (a wait that then runs out
        names the peer)."""
        self.rejected[peer] = self.rejected.get(peer, 0) + 1
        log.warning("stage %d dropped a frame from stage %d: %s", self.me, peer, exc)

    def _file(self, frame: Frame) -> None:
        self._stash.file(frame, self.step, self.tag)

    def _take(self, peer: int, kind: Kind, micro: int) -> Frame:
        key = (peer, kind, micro, self.tag)
        t0 = time.perf_counter()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while key not in self._stash:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if left == 0.0:
                    raise ChannelTimeout(self._waited(peer, kind, micro))
                try:
                    self._file(self.channels[peer].recv(timeout=left))
                except FrameError as exc:
                    self._reject(peer, exc)
                except ChannelTimeout:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ChannelTimeout(self._waited(peer, kind, micro)) from None
        finally:
            self.stats.wait_s += time.perf_counter() - t0
        return self._stash.pop(key)

    def _waited(self, peer: int, kind: Kind, micro: int) -> str:
        """What a wait that ran out was for, in the words of the frame's kind."""
        return (f"stage {self.me} waited {self.timeout:g} s for {describe(kind, micro)} "
                f"(step {self.step}) from stage {peer}")

    def _check_activation(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size or x.dtype != self.dtype:
            raise FrameError(
                f"stage {self.me - 1} sent an activation of {tuple(x.shape)} {x.dtype}; expected "
                f"(batch, seq, {self.hidden_size}) {self.dtype}"
            )
        return x

    def _check_labels(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2 or y.dtype != torch.int64:
            raise FrameError(f"labels of {tuple(y.shape)} {y.dtype}; expected (batch, seq) int64")
        vocab = self.stage.head.out_features
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= vocab):
            raise FrameError(f"labels outside the vocabulary [0, {vocab})")
        return y

