"""Checkpoints: per-stage files (parameters + optimizer state) and a JSON manifest of hashes.

Every file is written atomically (temp file + rename) and verified by SHA-256 on load; nothing is
unpickled. Layout: ``DIR/step_<k>/stage_<i>.safetensors``, ``DIR/step_<k>/manifest.json`` and
``DIR/latest.json`` naming the newest complete checkpoint. A stage may keep its file in another
format (a :class:`StageStore`: the enclave's stage seals it, ``stage_<i>.sealed``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from phalanx.errors import PhalanxError
from phalanx.fileio import atomic_write_json, sha256_file
from phalanx.pipeline.worker import StageWorker

FORMAT = "phalanx-checkpoint-1"


class StageStore(Protocol):
    """How one stage's tensors become the bytes of its checkpoint file, and back."""

    suffix: str

    def dump(self, tensors: dict[str, torch.Tensor]) -> bytes: ...

    def load(self, data: bytes) -> dict[str, torch.Tensor]: ...


class PlainStore:
    """Safetensors, in the clear."""

    suffix = ".safetensors"

    def dump(self, tensors: dict[str, torch.Tensor]) -> bytes:
        return save_bytes(tensors, metadata={"format": FORMAT})

    def load(self, data: bytes) -> dict[str, torch.Tensor]:
        return load_bytes(data)


PLAIN = PlainStore()


def stage_tensors(worker: StageWorker) -> dict[str, torch.Tensor]:
    """Parameters, AdamW state and RNG state of a stage, as named tensors."""
    out = {f"param.{n}": p.detach().contiguous() for n, p in worker.stage.named_parameters()}
    opt = worker.optimizer
    if opt is not None:
        for i, p in enumerate(opt.params):
            for key, value in opt.opt.state.get(p, {}).items():
                out[f"optim.{i}.{key}"] = value.detach().contiguous()
        out["meta.steps_done"] = torch.tensor([opt.steps_done], dtype=torch.int64)
    out["meta.rng"] = torch.get_rng_state()
    return out


def save_stage(directory: Path, worker: StageWorker, store: StageStore = PLAIN) -> str:
    """Write stage ``worker.me``'s file atomically; returns its SHA-256."""
    path = directory / f"stage_{worker.me}{store.suffix}"
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(store.dump(stage_tensors(worker)))
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def write_manifest(directory: Path, step: int, hashes: dict[int, str], extra: dict,
                   suffixes: dict[int, str] | None = None) -> None:
    """Record the stage files (``.safetensors`` unless ``suffixes`` says otherwise) and their
    hashes, then point ``latest.json`` at this checkpoint."""
    suffixes = suffixes or {}
    manifest = {
        "format": FORMAT, "step": step,
        "stages": {str(i): {"file": f"stage_{i}{suffixes.get(i, PLAIN.suffix)}", "sha256": h}
                   for i, h in sorted(hashes.items())},
        **extra,
    }
    atomic_write_json(directory / "manifest.json", manifest)
    atomic_write_json(directory.parent / "latest.json", {"checkpoint": directory.name})


def read_manifest(root: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint under ``root`` and its manifest."""
    latest = root / "latest.json"
    try:
        name = json.loads(latest.read_text())["checkpoint"]
        directory = root / Path(name).name
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise PhalanxError(f"no checkpoint to resume from in {root}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PhalanxError(f"checkpoint index in {root} is unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise PhalanxError(f"{directory}/manifest.json is not a {FORMAT} manifest")
    return directory, manifest


def load_stage(directory: Path, manifest: dict, worker: StageWorker,
               store: StageStore = PLAIN) -> None:
    """Restore stage ``worker.me`` from its file after checking the file's hash."""
    entry = manifest.get("stages", {}).get(str(worker.me))
    if not isinstance(entry, dict):
        raise PhalanxError(f"checkpoint {directory} has no stage {worker.me}")
    path = directory / Path(str(entry.get("file", ""))).name
    if path.suffix != store.suffix:
        raise PhalanxError(f"checkpoint file {path} is not a {store.suffix} file, as stage "
                           f"{worker.me} of this run keeps it")
    if not path.is_file():
        raise PhalanxError(f"checkpoint file {path} is missing")
    if sha256_file(path) != entry.get("sha256"):
        raise PhalanxError(f"checkpoint file {path} does not match its hash: it is corrupt")
    try:
        tensors = store.load(path.read_bytes())
    except (SafetensorError, OSError) as exc:
        raise PhalanxError(f"cannot read checkpoint file {path}: {exc}") from None
    params = dict(worker.stage.named_parameters())
    names = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if names != set(params):
        raise PhalanxError(f"{path} holds other parameters than stage {worker.me}: was it saved "
                           "with another model, stage split or set of replicas (defense.verify, "
                           "defense.second)?")
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[f"param.{n}"]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise PhalanxError(f"{path}: {n} has shape {tuple(t.shape)} {t.dtype}, expected "
                                   f"{tuple(p.shape)} {p.dtype}")
            p.copy_(t)
    opt = worker.optimizer
    if opt is not None:
        for i, p in enumerate(opt.params):
            state = {k.split(".", 2)[2]: v for k, v in tensors.items()
                     if k.startswith(f"optim.{i}.")}
            if state:
                opt.opt.state[p] = {k: v.to(p.device) for k, v in state.items()}
        opt.steps_done = int(tensors["meta.steps_done"][0])
        opt.refresh_lr()
    torch.set_rng_state(tensors["meta.rng"])
