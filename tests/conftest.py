"""Shared fixtures: tiny models, and a guard that kills processes a test left behind."""

from __future__ import annotations

import os
import signal

import psutil
import pytest


@pytest.fixture(scope="session", autouse=True)
def _kill_leftover_processes():
    """Multi-process tests spawn torchrun jobs; none may outlive the session."""
    yield
    me = psutil.Process(os.getpid())
    for child in me.children(recursive=True):
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
