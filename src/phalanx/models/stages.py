"""Cut a causal LM into pipeline stages.

first = embeddings + blocks, middle = blocks, last = blocks + final norm + LM head. A stage keeps
the original parameter names (``names``) so its gradients can be compared with the unsplit
model's. When input and output embeddings are tied and the first and last stages differ, the last
stage holds its own copy of the embedding matrix; the pipeline sums both copies' gradients so
training stays identical to the unsplit model (``tied`` lists those parameters).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.errors import PhalanxError


class StageModule(nn.Module):
    """Blocks ``layers[start:stop]`` of a causal LM, plus embeddings (first) and head (last)."""

    def __init__(
        self, *, family: str, config, index: int, num_stages: int, start: int, stop: int,  # noqa: ANN001
        embed: nn.Module | None, pos_embed: nn.Module | None, blocks: Sequence[nn.Module],
        rotary: nn.Module | None, norm: nn.Module | None, head: nn.Module | None,
        names: dict[str, str], tied: dict[str, str],
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.index, self.num_stages = index, num_stages
        self.start, self.stop = start, stop
        self.embed = embed
        self.pos_embed = pos_embed
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary
        self.norm = norm
        self.head = head
        self.names = names  # local parameter name -> name in the unsplit model
        self.tied = tied  # local name -> canonical name, for parameters shared with another stage
        self.drop = nn.Dropout(getattr(config, "embd_pdrop", 0.0)) if family == "gpt2" else None
        self.autocast: torch.dtype | None = None  # mixed precision: compute dtype of autocast

    def replicas(self) -> list[nn.Parameter]:
        """Parameters this stage holds as copies of stage 0's (a tied output embedding): stage 0
        owns and updates them; this stage only uses them."""
        if self.is_first or not self.is_last:
            return []
        params = dict(self.named_parameters())
        return [params[local] for local in sorted(self.tied)]

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, hidden states (B, T, C) elsewhere; returns hidden
        states (B, T, C), or logits (B, T, V) on the last stage. Under mixed precision the
        layers compute in ``self.autocast`` while the weights (and so the optimizer) stay in
        their own dtype."""
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            ids = x  # (B, T)
            x = self.embed(ids)  # (B, T, C)
        T = x.shape[1]
        pos = torch.arange(T, device=x.device).unsqueeze(0)  # (1, T)
        if self.is_first and self.pos_embed is not None:
            x = self.drop(x + self.pos_embed(pos))
        x = run_blocks(self.family, self.blocks, self.rotary, x, pos,
                       _causal_mask(self.config, x, pos))
        if self.is_last:
            x = self.head(self.norm(x))  # (B, T, V)
        return x


def run_blocks(family: str, blocks: Sequence[nn.Module], rotary: nn.Module | None,
               x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden states (B, T, C) through ``blocks`` at positions ``pos`` (1, T) under ``mask``."""
    if family == "llama":
        rope = rotary(x, position_ids=pos) if len(blocks) else None
        for block in blocks:
            x = _first(block(x, attention_mask=mask, position_embeddings=rope,
                             position_ids=pos))
    else:
        for block in blocks:
            x = _first(block(x, None, mask, None, position_ids=pos))
    return x


@functools.cache
def _no_cache_kwarg() -> str:
    """The name transformers gives the (absent) KV cache of ``create_causal_mask``: ``cache``
    from 5.24 on, ``past_key_values`` before (deprecated since)."""
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters \
        else "past_key_values"


def _causal_mask(config, x: torch.Tensor, pos: torch.Tensor):  # noqa: ANN001, ANN202
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=x, attention_mask=None,
                              position_ids=pos, **{_no_cache_kwarg(): None})


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V) at t predict ids (B, T) at t+1."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))


def balanced_bounds(num_layers: int, num_stages: int) -> list[int]:
    """Cut points (first layer of stages 1..N-1) splitting ``num_layers`` as evenly as possible."""
    base, extra = divmod(num_layers, num_stages)
    cuts, at = [], 0
    for s in range(num_stages - 1):
        at += base + (1 if s < extra else 0)
        cuts.append(at)
    return cuts


def resolve_bounds(num_layers: int, num_stages: int, cuts: Sequence[int] | None) -> list[int]:
    """Validated cut points: balanced by default, or explicit (strictly increasing, in range)."""
    if num_stages < 1:
        raise PhalanxError(f"pipeline.stages={num_stages} must be at least 1")
    if num_stages > num_layers:
        raise PhalanxError(
            f"pipeline.stages={num_stages} is more than the model's {num_layers} layers: "
            f"use at most {num_layers} stages"
        )
    if not cuts:
        return balanced_bounds(num_layers, num_stages)
    cuts = list(cuts)
    if len(cuts) != num_stages - 1:
        raise PhalanxError(
            f"pipeline.boundaries has {len(cuts)} cut points; {num_stages} stages need "
            f"{num_stages - 1} (the first layer of each stage after the first)"
        )
    points = [0, *cuts, num_layers]
    if any(b <= a for a, b in zip(points, points[1:], strict=False)):
        raise PhalanxError(
            f"pipeline.boundaries={cuts} must be strictly increasing within 1..{num_layers - 1} "
            "so that every stage has at least one layer"
        )
    return cuts


def _parts(model: nn.Module, family: str) -> dict:
    if family == "llama":
        core = model.model
        return dict(prefix="model", embed=("embed_tokens", core.embed_tokens), pos=None,
                    blocks=("layers", core.layers), rotary=core.rotary_emb,
                    norm=("norm", core.norm), head=model.lm_head)
    core = model.transformer
    return dict(prefix="transformer", embed=("wte", core.wte), pos=("wpe", core.wpe),
                blocks=("h", core.h), rotary=None, norm=("ln_f", core.ln_f), head=model.lm_head)


def blocks_of(model: nn.Module, family: str) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    return _parts(model, family)["blocks"][1]


def embedding_of(model: nn.Module, family: str) -> nn.Embedding:
    """The model's input token embedding."""
    return _parts(model, family)["embed"][1]


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def set_precision(stage: nn.Module, precision: str) -> None:
    """Mixed precision for ``stage`` and every stage module inside it (a verifier's replica
    computes exactly as its original): ``fp32`` (off) or ``bf16`` autocast."""
    if precision not in PRECISIONS:
        raise PhalanxError(f"pipeline.precision={precision!r} is unknown; use one of "
                           f"{', '.join(PRECISIONS)}")
    for m in stage.modules():
        if isinstance(m, StageModule):
            m.autocast = PRECISIONS[precision]


def ties_embeddings(model: nn.Module, family: str) -> bool:
    """Whether the model's output head shares its matrix with the input embedding: a fact of
    the model, the same in every process (a stage's own ``tied`` is empty in the middle)."""
    return model.lm_head.weight is _parts(model, family)["embed"][1].weight


def partition(
    model: nn.Module, family: str, num_stages: int, cuts: Sequence[int] | None = None,
    only: int | None = None,
) -> list[StageModule]:
    """Cut ``model`` into ``num_stages`` stage modules (or only stage ``only``).

    The stages share their modules with ``model`` except a tied output embedding, which the last
    stage of a multi-stage pipeline gets as its own copy.
    """
    p = _parts(model, family)
    blocks_name, blocks = p["blocks"]
    bounds = resolve_bounds(len(blocks), num_stages, cuts)
    points = [0, *bounds, len(blocks)]
    pre = p["prefix"]
    tied_model = ties_embeddings(model, family)
    stages = []
    for i in range(num_stages):
        if only is not None and i != only:
            continue
        start, stop = points[i], points[i + 1]
        first, last = i == 0, i == num_stages - 1
        names: dict[str, str] = {}
        tied: dict[str, str] = {}

        head = None
        if last:
            head = model.lm_head
            if tied_model and not first:
                head = nn.Linear(head.in_features, head.out_features, bias=False)
                head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        stage = StageModule(
            family=family, config=model.config, index=i, num_stages=num_stages,
            start=start, stop=stop,
            embed=p["embed"][1] if first else None,
            pos_embed=p["pos"][1] if (first and p["pos"]) else None,
            blocks=list(blocks[start:stop]), rotary=p["rotary"],
            norm=p["norm"][1] if last else None, head=head, names=names, tied=tied,
        )
        canon_embed = f"{pre}.{p['embed'][0]}.weight"
        for local, _ in stage.named_parameters(remove_duplicate=False):
            root, _, rest = local.partition(".")
            if root == "embed":
                names[local] = f"{pre}.{p['embed'][0]}.{rest}"
            elif root == "pos_embed":
                names[local] = f"{pre}.{p['pos'][0]}.{rest}"
            elif root == "blocks":
                idx, _, tail = rest.partition(".")
                names[local] = f"{pre}.{blocks_name}.{start + int(idx)}.{tail}"
            elif root == "norm":
                names[local] = f"{pre}.{p['norm'][0]}.{rest}"
            elif root == "head":
                names[local] = canon_embed if tied_model else f"lm_head.{rest}"
        if tied_model and num_stages > 1 and (first or last):
            tied[("embed.weight" if first else "head.weight")] = canon_embed
        stages.append(stage)
    return stages
