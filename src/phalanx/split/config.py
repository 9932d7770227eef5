"""Where a model is split between a data owner (the client) and a server."""

from __future__ import annotations

from dataclasses import dataclass

from phalanx.errors import ConfigError

MODES = {"none": 0, "layers": 2, "u": 3}
"""Split modes and the pipeline stages each makes (``none``: no split, the pipeline as set)."""


@dataclass(kw_only=True)
class SplitConfig:
    """Paper 2's split fine-tuning by layers.

    ``layers``: the client runs the embeddings and the first ``cut`` layers (frozen) and sends
    their hidden states with the labels; the server runs the remaining layers, the head and the
    loss, and holds the trainable parts (``trainable.*``). ``u`` (U-shaped): the client also
    keeps the last ``tail`` layers, the head and the loss, so the labels never leave it; the
    server runs the layers in between. Either sets ``pipeline.stages`` (2 or 3)."""

    mode: str = "none"  # none | layers | u
    cut: int = 2  # layers the client runs before the server's (>= 1)
    tail: int = 1  # u: layers the client runs after the server's, with the head (>= 1)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def stages(self) -> int:
        return MODES[self.mode]

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"split.mode={self.mode!r} is unknown; use one of "
                              f"{', '.join(MODES)}")
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
