"""Shared fixtures: tiny models, and a guard that kills processes a test left behind."""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest
import torch


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a loaded 2-core machine intra-op threads cost up to 400x; one thread
    for the tests of a module that asks (``pytestmark = pytest.mark.usefixtures(...)``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def serve_coordinator():
    """Start a coordinator's mesh that listens (and answers joins) until its rendezvous times
    out, in the background; its listener is closed after the test."""
    from phalanx.comm.channel import ChannelTimeout

    started = []

    def start(mesh) -> None:  # noqa: ANN001
        def run() -> None:
            try:
                mesh.connect()
            except ChannelTimeout:
                pass

        threading.Thread(target=run, daemon=True).start()
        started.append(mesh)

    yield start
    for m in started:
        m.close()


@pytest.fixture(scope="session")
def six_layers(tmp_path_factory) -> str:
    """A random Llama of 6 layers in a model folder (byte-level tokens), for 6 stages."""
    import torch
    from transformers import AutoModelForCausalLM

    from phalanx.models.loading import tiny_config

    conf = tiny_config()
    conf.num_hidden_layers = 6
    path = tmp_path_factory.mktemp("six")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(path)
    return str(path)


@pytest.fixture()
def cli(capsys):
    """``phalanx ARGS`` in this process (the ``main`` the console script runs): its exit code
    and its standard error. For refusals: no process start, and an exception other than the
    CLI's own errors propagates as a traceback, failing the test."""
    from phalanx.cli.main import main

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err
    return run
