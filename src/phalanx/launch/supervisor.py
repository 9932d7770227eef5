"""Start one process per stage on this machine and supervise them until they all end.

No torchrun: the ranks find each other through ``torch.distributed``'s ``env://`` rendezvous on
a loopback port this launcher picks (a TCPStore of bytes, nothing unpickled; torchrun's elastic
c10d rendezvous unpickles what it reads from an unauthenticated store). The launcher

- puts the stages in a process group of their own and makes each die with it
  (:mod:`phalanx.launch.status`), so ``kill -9`` of the launcher leaves no orphan training on;
- ends the whole group on *every* failure: once one stage exits non-zero, the others get
  ``grace`` seconds to notice and report, then SIGTERM, then SIGKILL;
- on a signal (Ctrl-C, SIGTERM, SIGHUP) or a timeout, ends the group first;
- turns what the stages left in their status files into one report: which stage failed first,
  at which step and how, and what each other stage was doing; full tracebacks go to a log file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phalanx.launch.status import LAUNCHER_PID, STATUS_DIR, read_status

EXIT_USAGE = 2
EXIT_TIMEOUT = 124


@dataclass
class StageExit:
    """How one stage process ended, and the last word it left."""

    rank: int
    code: int
    order: int  # the launcher's poll in which it was seen to end
    status: dict | None = None
    stopped: bool = False  # ended by the launcher


@dataclass
class Outcome:
    """A finished launch: the exit code to return and, on failure, the report."""

    code: int
    exits: list[StageExit] = field(default_factory=list)
    report: str = ""
    log: Path | None = None


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_env(rank: int, nproc: int, port: int, status_dir: Path) -> dict[str, str]:
    """The environment of stage ``rank``: the ``env://`` rendezvous and the launcher's ties."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONUNBUFFERED="1")
    env[STATUS_DIR] = str(status_dir)
    env[LAUNCHER_PID] = str(os.getpid())
    return env


class _Stop(Exception):
    """A signal asked the launcher to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Stop` (SIGINT already raises KeyboardInterrupt)."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise _Stop(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Launch:
    """``nproc`` processes of ``python -m phalanx.cli <args>``, one per stage."""

    def __init__(self, nproc: int, args: list[str], *, grace: float = 10.0,
                 log_dir: Path | None = None) -> None:
        self.nproc, self.args, self.grace, self.log_dir = nproc, args, grace, log_dir
        self.procs: list[subprocess.Popen] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="phalanx-launch-")
        self.status_dir = Path(self._tmp.name)

    def start(self) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "phalanx.cli", *self.args]
        for rank in range(self.nproc):
            group = self.procs[0].pid if self.procs else 0  # one process group for all stages
            self.procs.append(subprocess.Popen(
                cmd, env=stage_env(rank, self.nproc, port, self.status_dir),
                process_group=group, stdin=subprocess.DEVNULL))

    def wait(self, timeout: float | None = None) -> Outcome:
        """Supervise until every stage has ended; see the module docstring."""
        t0 = time.monotonic()
        ended: dict[int, StageExit] = {}
        stopped: set[int] = set()
        first_failure: float | None = None
        timed_out, polls = False, 0
        while len(ended) < self.nproc:
            polls += 1
            for rank, p in enumerate(self.procs):
                if rank not in ended and (code := p.poll()) is not None:
                    ended[rank] = StageExit(rank, code, polls, stopped=rank in stopped)
                    if code and first_failure is None:
                        first_failure = time.monotonic()
            now = time.monotonic()
            late = first_failure is not None and now - first_failure > self.grace
            if timeout is not None and now - t0 > timeout and not timed_out:
                timed_out, late = True, True
            if late and len(ended) < self.nproc:
                stopped |= {r for r in range(self.nproc) if r not in ended}
                self.stop()
                continue
            time.sleep(0.1)
        exits = [ended[r] for r in range(self.nproc)]
        for e in exits:
            e.status = read_status(self.status_dir, e.rank)
            e.stopped = e.stopped or e.rank in stopped
        return self._outcome(exits, timed_out, timeout)

    def stop(self) -> None:
        """End every stage still running: SIGTERM to the group, SIGKILL after 5 s."""
        if not self.procs:
            return
        pgid = self.procs[0].pid
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            for p in self.procs:  # a stage that left the group still gets the signal
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.05)
            if all(p.poll() is not None for p in self.procs):
                return

    def close(self) -> None:
        self._tmp.cleanup()

    # -- the report ------------------------------------------------------------------------
    def _outcome(self, exits: list[StageExit], timed_out: bool, timeout: float | None) -> Outcome:
        if not timed_out and all(e.code == 0 for e in exits):
            return Outcome(0, exits)
        culprit = min((e for e in exits if not e.stopped and e.code), key=_when, default=None)
        if not timed_out and culprit is not None and (culprit.status or {}).get("user_error"):
            # bad input found by a stage itself (the others stopped with it): the one line
            return Outcome(EXIT_USAGE, exits, report=culprit.status["error"].split(": ", 1)[1])
        lines = []
        if timed_out:
            lines.append(f"the run did not finish within {timeout:g} s and was stopped")
        if culprit is not None:
            lines.append(f"stage {culprit.rank} failed first: {describe_exit(culprit)}")
        for e in exits:
            if e is not culprit:
                lines.append(f"  stage {e.rank}: {describe_exit(e)}")
        code = EXIT_TIMEOUT if timed_out else next(
            (e.code for e in sorted(exits, key=_when) if e.code > 0), 1)
        return Outcome(code, exits, report="\n".join(lines), log=self._write_log(exits))

    def _write_log(self, exits: list[StageExit]) -> Path | None:
        traces = [(e.rank, e.status["traceback"]) for e in exits
                  if e.status and e.status.get("traceback")]
        if not traces:
            return None
        directory = self.log_dir or Path(tempfile.gettempdir())
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "failure.log" if self.log_dir else Path(
            tempfile.mkstemp(prefix="phalanx-failure-", suffix=".log", dir=directory)[1])
        path.write_text("".join(f"--- stage {r} ---\n{t}\n" for r, t in traces))
        return path


FOLLOWER_ERRORS = ("ChannelTimeout", "ChannelClosed")  # a peer went silent, or went away


def _when(e: StageExit) -> tuple[int, int, float]:
    """Which failure came first, as a sort key. A stage that failed because a link timed out
    or closed followed another one's failure, however early it exited (the one that failed may
    still be unwinding); a timeout comes before the closed links it causes. Then the order the
    launcher saw, then the time of the status."""
    err = str((e.status or {}).get("error", ""))
    rank = next((i + 1 for i, f in enumerate(FOLLOWER_ERRORS) if err.startswith(f)), 0)
    return rank, e.order, float((e.status or {}).get("time", 0.0))


def describe_exit(e: StageExit) -> str:
    """How a stage ended, in one line: the way it exited, where it was, its error."""
    st = e.status or {}
    phase = st.get("during") or st.get("phase")
    step = st.get("step")
    where = ""
    if phase == "training" and step is not None:
        where = f" during step {step}"
    elif phase not in (None, "done", "failed"):
        where = f" while {phase}" + (f" after step {step}" if step is not None else "")
    if e.code == 0:
        return "finished"
    if e.code < 0:
        killed = f"killed by {signal.Signals(-e.code).name}"
        return ("stopped by the launcher" if e.stopped else killed) + where
    err = st.get("error")
    if err:
        return f"exited with code {e.code}{where}: {err}"
    return f"exited with code {e.code}{where}" + (" (stopped by the launcher)" if e.stopped
                                                   else "")


def spawn(nproc: int, args: list[str], *, timeout: float | None = None, grace: float = 10.0,
          log_dir: Path | None = None, quiet: bool = False) -> int:
    """Run ``phalanx <args>`` as ``nproc`` local stage processes; returns the exit code and,
    unless ``quiet``, prints the failure report (one line for bad input) to stderr."""
    launch = Launch(nproc, args, grace=grace, log_dir=log_dir)
    try:
        with _signals_stop():
            launch.start()
            outcome = launch.wait(timeout)
    except _Stop as stop:
        launch.stop()
        print(f"phalanx: stopped by {stop}; the stages were ended", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        launch.stop()
        raise
    finally:
        if any(p.poll() is None for p in launch.procs):
            launch.stop()
        launch.close()
    if outcome.code and not quiet:
        print(f"phalanx: error: {outcome.report}", file=sys.stderr)
        if outcome.log is not None:
            print(f"phalanx: tracebacks of the stages: {outcome.log}", file=sys.stderr)
    return outcome.code
