"""A learned inversion decoder: hidden state at the cut -> the token at the same position.

Attacker model: knows the public pretrained weights of the embedding and layers ``[0, cut)``
and has public text of its own (e.g. the standard-library docstrings): it runs the public
prefix on that text to get (hidden state, token) pairs and fits a small per-position decoder,
a linear map (warm-started from the public embedding matrix) or a one-hidden-layer residual
MLP, then applies it to what it receives. Needs no search and tolerates noise and drifted
weights better than the exact search, but learns only what its text shows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.errors import ConfigError
from phalanx.privacy.cut import Prefix


class InversionDecoder(nn.Module):
    """Logits (..., V') of the token at each position from its hidden state (..., C), over
    ``tokens`` (default the whole vocabulary of ``vocab`` ids)."""

    def __init__(self, dim: int, vocab: int, *, hidden: int = 0,
                 init: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> None:
        super().__init__()
        if hidden < 0:
            raise ConfigError(f"privacy decoder hidden={hidden} must be >= 0 (0: linear)")
        tokens = torch.arange(vocab) if tokens is None else tokens.long()
        if tokens.numel() == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise ConfigError(f"privacy decoder tokens must be ids in 0..{vocab - 1}")
        self.register_buffer("tokens", tokens)  # (V',) the ids it can output
        lookup = torch.full((vocab,), -1, dtype=torch.long)
        lookup[tokens] = torch.arange(len(tokens))
        self.register_buffer("lookup", lookup)  # (V,) id -> output index, -1 if none
        self.mlp = (nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                    if hidden else None)
        self.out = nn.Linear(dim, len(tokens))
        if init is not None:  # start from nearest-embedding decoding (dot product)
            rows = init.float()[tokens]
            with torch.no_grad():
                self.out.weight.copy_(rows / rows.norm(dim=-1).mean())
                self.out.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = x / x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()  # (..., C), unit RMS
        if self.mlp is not None:
            x = x + self.mlp(x)
        return self.out(x)  # (..., V)

    @torch.no_grad()
    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Most likely token ids (...) of hidden states (..., C)."""
        return self.tokens[self(h).argmax(-1)]


@torch.no_grad()
def decoder_pairs(prefix: Prefix, blocks: torch.Tensor,
                  batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs from public token blocks (N, T): hidden states (N*T, C), ids (N*T,)."""
    prefix.eval()
    feats = [prefix(part).reshape(-1, prefix.embed.weight.shape[1]).float()
             for part in blocks.split(batch)]
    return torch.cat(feats), blocks.reshape(-1)


def train_decoder(decoder: InversionDecoder, feats: torch.Tensor, targets: torch.Tensor, *,
                  steps: int = 300, batch: int = 256, lr: float = 3e-3,
                  seed: int = 0) -> list[float]:
    """Fit ``decoder`` to (hidden state, token) pairs with AdamW; the loss of every step."""
    if steps < 1 or batch < 1 or len(targets) == 0:
        raise ConfigError(f"privacy decoder training needs steps, batch >= 1 and pairs (got "
                          f"steps={steps}, batch={batch}, {len(targets)} pairs)")
    index = decoder.lookup[targets]
    if bool((index < 0).any()):
        raise ConfigError("privacy decoder training targets include tokens it cannot output")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    decoder.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(targets), (batch,), generator=gen)
        loss = F.cross_entropy(decoder(feats[idx]), index[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    decoder.eval()
    return losses


def fit_decoder(prefix: Prefix, blocks: torch.Tensor, *, feats: torch.Tensor | None = None,
                hidden: int = 0, warm_start: bool = True, seen_only: bool = False,
                steps: int = 300, batch: int = 256, lr: float = 3e-3,
                seed: int = 0) -> InversionDecoder:
    """A decoder trained (:func:`train_decoder`) on the public prefix's hidden states of
    public token blocks (N, T) (``feats`` (N*T, C) if already computed). ``seen_only``: it
    outputs only the tokens the public text contains (much cheaper for a large vocabulary; a
    token the text never shows cannot be learnt anyway)."""
    if feats is None:
        feats, targets = decoder_pairs(prefix, blocks)
    else:
        targets = blocks.reshape(-1)
    weight = prefix.embed.weight.detach()
    decoder = InversionDecoder(weight.shape[1], weight.shape[0], hidden=hidden,
                               init=weight if warm_start else None,
                               tokens=targets.unique() if seen_only else None)
    train_decoder(decoder, feats, targets, steps=steps, batch=batch, lr=lr, seed=seed)
    return decoder
