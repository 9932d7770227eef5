"""``phalanx split`` — the two parties of split fine-tuning as separate processes (and hosts).

- ``split platform --out DIR``: a simulated enclave platform for the server's host (the vendor's
  key pair and the sealing secret); give the client only ``DIR/vendor_public.pem``.
- ``split server``: the server's stage (stage 1), its trainable parts in the enclave.
- ``split client``: the data owner's stages (0, and 2 under ``split.mode=u``); stage 0 is the
  coordinator. Both over the secure transport (``secure.key``, ``secure.roster``,
  ``secure.coordinator``: see the README's section on several hosts).

Both default to ``split.mode=layers`` and ``split.enclave=simulated``; every other setting is a
``phalanx train`` override, and both sides must give the same model, data and split settings
(else the client's expected measurement is not the server's, and it refuses the server).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from phalanx.errors import PhalanxError

CHILD_GRACE_S = 10.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "split", help="split fine-tuning: the client and the server as separate processes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].replace("``", ""))
    ss = s.add_subparsers(dest="action", required=True, metavar="{platform,server,client}")
    sp = ss.add_parser("platform", help="a simulated enclave platform (vendor keys, sealing "
                       "secret) in --out")
    sp.add_argument("--out", required=True, help="platform folder (must not exist)")
    for name, what in (("server", "the server's stage, in the enclave"),
                       ("client", "the data owner's stages (the coordinator)")):
        p = ss.add_parser(name, help=what)
        p.add_argument("--config", help="TOML config file")
        p.add_argument("overrides", nargs="*", help="phalanx train overrides, key=value")


def _forced(a: argparse.Namespace, stage: int) -> list[str]:
    """The overrides that make ``phalanx train`` run one party's ``stage``."""
    from phalanx.cli.main import _config

    cfg = _config(a.config, a.overrides)
    extra = ['pipeline.runtime="secure"', f"secure.stage={stage}"]
    if not cfg.split.active:
        extra.append('split.mode="layers"')
    enclave = cfg.split.enclave != "none" or not _given(a.overrides, "split.enclave")
    if cfg.split.enclave == "none" and enclave:
        extra.append('split.enclave="simulated"')
    if enclave and not cfg.split.platform:
        raise PhalanxError("give split.platform: the server's platform folder (phalanx split "
                           "platform --out DIR); the client needs only its vendor_public.pem")
    return [*(["--config", a.config] if a.config else []), *a.overrides, *extra]


def _given(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def cmd_split(a: argparse.Namespace) -> int:
    from phalanx.cli.main import _config, _parser, cmd_train

    if a.action == "platform":
        from phalanx.split.platform import VENDOR_PUBLIC, new_platform

        out = Path(a.out)
        if out.exists():
            raise PhalanxError(f"--out {out} exists: a platform is made in a new folder")
        new_platform(out)
        print(json.dumps({"platform": str(out), "client_pins": str(out / VENDOR_PUBLIC)}))
        return 0
    if a.action == "server":
        argv = ["train", *_forced(a, 1)]
        return cmd_train(_parser().parse_args(argv), argv)
    base = _forced(a, 0)
    tail = None
    if _config(a.config, a.overrides).split.mode == "u":  # the client's tail: its own process
        child = [arg.replace("secure.stage=0", "secure.stage=2") for arg in base]
        tail = subprocess.Popen([sys.executable, "-m", "phalanx.cli", "train", *child])
    try:
        argv = ["train", *base]
        code = cmd_train(_parser().parse_args(argv), argv)
        if tail is not None:
            code = code or tail.wait(timeout=_config(a.config, a.overrides).pipeline.timeout_s)
        return code
    finally:
        if tail is not None and tail.poll() is None:
            tail.terminate()
            try:
                tail.wait(timeout=CHILD_GRACE_S)
            except subprocess.TimeoutExpired:
                tail.kill()
