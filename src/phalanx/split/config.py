"""Where a model is split between a data owner (the client) and a server."""

from __future__ import annotations

from dataclasses import dataclass

from phalanx.errors import ConfigError, check_choice

MODES = {"none": 0, "layers": 2, "u": 3}
"""Split modes and the pipeline stages each makes (``none``: no split, the pipeline as set)."""
ENCLAVES = ("none", "simulated")
SERVER = 1  # the server's stage: between the client's front (0) and, under ``u``, its tail (2)


@dataclass(kw_only=True)
class SplitConfig:
    """Paper 2's split fine-tuning by layers.

    ``layers``: the client runs the embeddings and the first ``cut`` layers (frozen) and sends
    their hidden states with the labels; the server runs the remaining layers, the head and the
    loss, and holds the trainable parts (``trainable.*``). ``u`` (U-shaped): the client also
    keeps the last ``tail`` layers, the head and the loss, so the labels never leave it; the
    server runs the layers in between. Either sets ``pipeline.stages`` (2 or 3).

    ``enclave=simulated`` puts the server's stage in an enclave (:mod:`phalanx.split.wiring`):
    every client stage checks its attestation report before it sends anything, then talks to
    it end to end encrypted (the server's host sees ciphertext), and the server's checkpoints
    are sealed."""

    mode: str = "none"  # none | layers | u
    cut: int = 2  # layers the client runs before the server's (>= 1)
    tail: int = 1  # u: layers the client runs after the server's, with the head (>= 1)
    enclave: str = "none"  # none | simulated: the server's stage runs in an attested enclave
    platform: str = ""  # folder of the simulated platform (phalanx split platform); "": one
    # is made under train.out_dir for a one-host run. The client reads only vendor_public.pem
    measurement: str = ""  # hex SHA-256 the client pins; "": computed from its own copy of the
    # public weights and the run's seed (what an honest server loads)
    masked: bool = False  # paper 2's method 1: the server's frozen linear layers run on its host
    # on one-time-pad-masked inputs, Freivalds-checked (masking.*); the rest stays inside

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def stages(self) -> int:
        return MODES[self.mode]

    @property
    def clients(self) -> tuple[int, ...]:
        """The client's stages (the data owner's)."""
        return (0, 2) if self.mode == "u" else (0,) if self.active else ()

    def validate(self) -> None:
        check_choice("split.mode", self.mode, MODES)
        check_choice("split.enclave", self.enclave, ENCLAVES)
        if (self.enclave != "none" or self.masked) and not self.active:
            key = "split.enclave" if self.enclave != "none" else "split.masked"
            raise ConfigError(f"{key} needs a split: set split.mode=layers or u")
        m = self.measurement
        if m and (len(m) != 64 or any(c not in "0123456789abcdefABCDEF" for c in m)):
            raise ConfigError(f"split.measurement={m!r} must be 64 hex digits (a SHA-256)")
        for key in ("cut", "tail"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"split.{key}={value!r} must be an integer >= 1")

    def cuts(self, num_layers: int) -> list[int]:
        """The pipeline's cut points for a model of ``num_layers`` layers (the server keeps at
        least one)."""
        client = self.cut + (self.tail if self.mode == "u" else 0)
        if client >= num_layers:
            keep = "split.cut" + (" + split.tail" if self.mode == "u" else "")
            raise ConfigError(
                f"{keep}={client} leaves the server none of the model's {num_layers} layers: "
                f"use at most {num_layers - 1} client layers")
        return [self.cut] if self.mode == "layers" else [self.cut, num_layers - self.tail]

    def server_layers(self, num_layers: int) -> range:
        """The layers the server runs (every layer when not split)."""
        if not self.active:
            return range(num_layers)
        cuts = self.cuts(num_layers)
        return range(cuts[0], cuts[1] if self.mode == "u" else num_layers)
