"""Start one process per stage with torchrun, each running a phalanx subcommand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def torchrun_argv(nproc: int, args: list[str]) -> list[str]:
    """The command that runs ``phalanx <args>`` in ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "phalanx.cli", *args]


def spawn(nproc: int, args: list[str], timeout: float | None = None) -> int:
    """Run ``phalanx <args>`` as ``nproc`` local processes; returns the exit code.

    The processes share this machine's cores: each gets ``cores / nproc`` torch threads.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TORCHELASTIC_ERROR_FILE", os.devnull)
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(torchrun_argv(nproc, args), env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and all its children."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
