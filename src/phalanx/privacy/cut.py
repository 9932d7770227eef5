"""What an untrusted stage receives, and the attacker's public copy of the layers before it.

``cut`` is the number of decoder layers the data owner keeps after the embedding: cut 0 sends
the token embeddings, cut k sends the hidden states after layer k-1 (``pipeline.boundaries``'
first cut point). :class:`Prefix` runs embedding + layers ``[0, cut)`` of a model exactly as
stage 0 does, and also with a caller's attention mask and positions, which the exact search
uses to evaluate many candidate tokens in one packed sequence.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from phalanx.errors import ConfigError
from phalanx.models.stages import StageModule, blocks_of, embedding_of, run_blocks


def validate_cut(cut: int, num_layers: int) -> int:
    """``cut`` if it names a point inside the model (0..``num_layers``), else a ConfigError."""
    if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= num_layers:
        raise ConfigError(f"privacy cut={cut!r} is outside the model: use an integer in "
                          f"0..{num_layers} (the layers the data owner keeps)")
    return cut


def validate_sigma(sigma: float, name: str = "sigma") -> float:
    """``sigma`` as a float if it is finite and >= 0, else a ConfigError."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ConfigError(f"privacy {name}={sigma!r} must be a number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"privacy {name}={sigma!r} must be a finite number >= 0")
    return value


class Prefix(nn.Module):
    """Embedding + decoder layers ``[0, cut)`` of a causal LM (Llama or GPT-2 family).

    It shares its modules with ``model``: built on the public pretrained weights it is the
    attacker's copy; built on the victim's model it computes what stage 0 sends.
    """

    def __init__(self, model: nn.Module, family: str, cut: int) -> None:
        super().__init__()
        blocks = blocks_of(model, family)
        self.cut = validate_cut(cut, len(blocks))
        self.family = family
        self.embed = embedding_of(model, family)
        self.pos_embed = model.transformer.wpe if family == "gpt2" else None
        self.rotary = model.model.rotary_emb if family == "llama" else None
        self.blocks = nn.ModuleList(list(blocks[:cut]))
        self.stage = StageModule(
            family=family, config=model.config, index=0, num_stages=2, start=0, stop=cut,
            embed=self.embed, pos_embed=self.pos_embed, blocks=list(self.blocks),
            rotary=self.rotary, norm=None, head=None, names={}, tied={},
        )

    @property
    def vocab_size(self) -> int:
        return int(self.embed.weight.shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> hidden states at the cut (B, T, C), as stage 0 computes them."""
        return self.stage(ids)

    def packed(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states at the cut of one packed sequence: ids and positions (1, S), a boolean
        attention mask (1, 1, S, S) where True lets a query (row) see a key (column)."""
        return self.layers(self.embedded(ids, pos), pos, mask)

    def embedded(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The input of layer 0 (B, S, C): token (+ position) embeddings of ids (B, S)."""
        x = self.embed(ids)  # (B, S, C)
        return x + self.pos_embed(pos) if self.pos_embed is not None else x

    def layers(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
               start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Hidden states (B, S, C) ``x`` at the input of layer ``start`` through layers
        ``[start, stop)`` (default: to the cut), at positions ``pos`` (1, S) under ``mask``."""
        blocks = self.blocks[start:self.cut if stop is None else stop]
        return run_blocks(self.family, blocks, self.rotary, x, pos, mask)

    @torch.no_grad()
    def at_cuts(self, ids: torch.Tensor, cuts: list[int]) -> dict[int, torch.Tensor]:
        """Hidden states (B, T, C) of ids (B, T) at each cut in ``cuts`` (each <= this
        prefix's cut), from one causal pass through the layers."""
        wanted = {validate_cut(c, self.cut) for c in cuts}
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)[None]
        mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()[None, None]
        x, out = self.embedded(ids, pos), {}
        for layer in range(max(wanted, default=-1) + 1):
            if layer in wanted:
                out[layer] = x
            x = self.layers(x, pos, mask, layer, layer + 1)
        return out


@torch.no_grad()
def cut_hidden(model: nn.Module, family: str, ids: torch.Tensor, cut: int) -> torch.Tensor:
    """What stage 1 receives when stage 0 keeps ``cut`` layers: hidden states (B, T, C)."""
    was = model.training
    model.eval()
    try:
        return Prefix(model, family, cut)(ids)
    finally:
        model.train(was)
