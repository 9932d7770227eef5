"""The worker side of a launch: die with the launcher, and leave word of what this stage did.

A stage process started by :func:`phalanx.launch.spawn` finds ``PHALANX_STATUS_DIR`` and
``PHALANX_LAUNCHER_PID`` in its environment. :func:`join_launcher` then

- asks the kernel to kill it when the launcher dies (``PR_SET_PDEATHSIG`` on Linux), with a
  watch thread on the parent's pid as a second line (and the only one elsewhere), so a stage
  never outlives a ``kill -9`` of its launcher;
- returns a :class:`StageStatus` that the stage updates as it goes (phase, step) and fills with
  its error when it fails, so the launcher can say which stage died, when, and what the others
  did.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

STATUS_DIR = "PHALANX_STATUS_DIR"
LAUNCHER_PID = "PHALANX_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1


def status_path(directory: Path, rank: int) -> Path:
    return directory / f"stage_{rank}.json"


class StageStatus:
    """This stage's status file: rewritten atomically at each change (a few hundred bytes)."""

    def __init__(self, directory: Path | None, rank: int) -> None:
        self.path = status_path(directory, rank) if directory is not None else None
        self.state: dict = {"stage": rank, "phase": "starting", "step": None, "pid": os.getpid()}
        self._write()

    def update(self, phase: str, step: int | None = None) -> None:
        """Where the stage is now: ``phase`` (starting, training, evaluating, checkpointing,
        done) and the step it works on."""
        if self.state["phase"] == phase and self.state["step"] == step:
            return
        self.state.update(phase=phase, step=step, time=time.time())
        self._write()

    def failed(self, exc: BaseException, user_error: bool) -> None:
        """Record the error that ends this stage (the traceback too, for the failure log)."""
        self.state.update(
            phase="failed", error=f"{type(exc).__name__}: {exc}", user_error=user_error,
            traceback="".join(traceback.format_exception(exc)), time=time.time(),
            during=self.state.get("phase"),
        )
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)


def read_status(directory: Path, rank: int) -> dict | None:
    """A stage's last status, or ``None`` if it left none (or none that parses)."""
    try:
        return json.loads(status_path(directory, rank).read_text())
    except (OSError, ValueError):
        return None


def join_launcher() -> StageStatus | None:
    """In a process started by :func:`phalanx.launch.spawn`: tie its life to the launcher's and
    return its status file; ``None`` in any other process (torchrun, a plain run)."""
    directory, parent = os.environ.get(STATUS_DIR), os.environ.get(LAUNCHER_PID)
    if not directory or not parent:
        return None
    _die_with(int(parent))
    return StageStatus(Path(directory), int(os.environ.get("RANK", "0")))


def _die_with(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="phalanx-launcher-watch").start()
