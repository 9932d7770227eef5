"""Every vocabulary token's context-free hidden state at each cut, built layer by layer, cached.

The exact search's :class:`~phalanx.privacy.search.TableRanker` needs, at cut k, the hidden
state of each token alone at position 0 and after one public anchor token at position 1. Both
are a layer-by-layer map (a token alone attends to itself only; after the anchor it attends to
the anchor, whose own states are one sequence): the table at cut k+1 is layer k applied to the
table at cut k. :func:`context_free_tables` therefore runs the whole vocabulary once through
the layers up to the deepest cut asked for and keeps the table at each cut on the way: one
pass for all cuts instead of one pass of k layers per cut.

Tables are unit rows rounded to float16 (a ranking needs no more, and a cached table then
equals a fresh one exactly). With ``cache_dir`` each cut's table is stored as safetensors
under a digest of everything it depends on (family, anchor, vocabulary size, the bytes of the
embedding and of every parameter and buffer of the layers before the cut); a file is used only
if its stored digest and shapes match and a few rows recomputed directly through the prefix
agree with it, otherwise it is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.errors import ConfigError
from phalanx.privacy.cut import Prefix, validate_cut
from phalanx.privacy.search import TableRanker, packed_mask

log = logging.getLogger(__name__)

FORMAT = b"phalanx-privacy-table-1"
PROBES = 4  # rows recomputed to validate a cached table
PROBE_COS = 0.999  # float16 unit rows agree with fresh ones to ~1e-4


def _update(h: hashlib._Hash, module: nn.Module) -> None:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def prefix_digests(prefix: Prefix, anchor: int) -> list[str]:
    """Hex digest of what the table at each cut 0..``prefix.cut`` depends on."""
    h = hashlib.sha256(FORMAT + f"\0{prefix.family}\0{anchor}\0{prefix.vocab_size}".encode())
    for part in (prefix.embed, prefix.pos_embed, prefix.rotary):
        if part is not None:
            _update(h, part)
    out = [h.hexdigest()]
    for block in prefix.blocks:
        _update(h, block)
        out.append(h.hexdigest())
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1).half().float()


def _ranker(alone: torch.Tensor, after: torch.Tensor) -> TableRanker:
    return TableRanker(_unit(alone), _unit(after))


@torch.no_grad()
def _direct(prefix: Prefix, cut: int, ids: torch.Tensor, anchor: int) -> TableRanker:
    """Rows of the tables at ``cut`` for ``ids`` (n,), computed directly (no layer chain)."""
    dev = prefix.embed.weight.device
    ids = ids.to(dev)
    zero = torch.zeros(1, 1, dtype=torch.long, device=dev)
    alone = prefix.layers(prefix.embedded(ids[:, None], zero), zero, None, 0, cut)[:, 0]
    n = len(ids)
    seq = torch.cat([torch.tensor([anchor], device=dev), ids])[None]
    pos = torch.cat([zero[0], torch.ones(n, dtype=torch.long, device=dev)])[None]
    mask = packed_mask(1, n).to(dev)
    after = prefix.layers(prefix.embedded(seq, pos), pos, mask, 0, cut)[0, 1:]
    return _ranker(alone, after)


def _path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / f"table-{digest[:40]}.safetensors"


def _read(path: Path, digest: str, prefix: Prefix, cut: int, anchor: int) -> TableRanker | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("digest") != digest:
                return None
            alone, after = f.get_tensor("alone").float(), f.get_tensor("after").float()
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is no cache
        log.warning("privacy table cache %s is unreadable (%s): rebuilding it", path, exc)
        return None
    shape = (prefix.vocab_size, prefix.embed.weight.shape[1])
    if alone.shape != shape or after.shape != shape:
        return None
    probe = torch.linspace(0, shape[0] - 1, PROBES).long()
    fresh = _direct(prefix, cut, probe, anchor)
    ok = all(bool((F.cosine_similarity(a[probe], b, dim=-1) >= PROBE_COS).all())
             for a, b in ((alone, fresh.alone), (after, fresh.after)))
    if not ok:
        log.warning("privacy table cache %s does not match the model: rebuilding it", path)
        return None
    return TableRanker(alone, after)


def _write(path: Path, digest: str, cut: int, ranker: TableRanker) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rows = {"alone": ranker.alone.half().contiguous(), "after": ranker.after.half().contiguous()}
    save_file(rows, str(tmp), metadata={"digest": digest, "cut": str(cut)})
    tmp.replace(path)


@torch.no_grad()
def context_free_tables(prefix: Prefix, cuts: Iterable[int], anchor: int, *,
                        chunk: int = 512, cache_dir: Path | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        ) -> dict[int, TableRanker]:
    """The ranking table at each cut in ``cuts`` (each <= ``prefix.cut``): from the cache
    where valid, else from one layer-by-layer pass of the vocabulary (``progress(layer,
    layers)`` after each layer)."""
    wanted = sorted({validate_cut(c, prefix.cut) for c in cuts})
    if not wanted or chunk < 1 or not 0 <= anchor < prefix.vocab_size:
        raise ConfigError(f"privacy tables need cuts, chunk >= 1 and an anchor in the vocabulary "
                          f"(got cuts={wanted}, chunk={chunk}, anchor={anchor})")
    prefix.eval()
    digests = prefix_digests(prefix, anchor)
    out: dict[int, TableRanker] = {}
    if cache_dir is not None:
        for c in wanted:
            hit = _read(_path(cache_dir, digests[c]), digests[c], prefix, c, anchor)
            if hit is not None:
                out[c] = hit
    if len(out) == len(wanted):
        return out
    dev = prefix.embed.weight.device
    V = prefix.vocab_size
    ids = torch.arange(V, device=dev)
    zero = torch.zeros(1, 1, dtype=torch.long, device=dev)
    alone = prefix.embedded(ids[:, None], zero)  # (V, 1, C)
    seq = torch.cat([torch.tensor([anchor], device=dev), ids])[None]
    pos = torch.cat([zero[0], torch.ones(V, dtype=torch.long, device=dev)])[None]
    after = prefix.embedded(seq, pos)[0]  # (1 + V, C): the anchor, then each token after it
    for layer in range(wanted[-1] + 1):
        if layer in wanted and layer not in out:
            out[layer] = _ranker(alone[:, 0], after[1:])
            if cache_dir is not None:
                _write(_path(cache_dir, digests[layer]), digests[layer], layer, out[layer])
        if layer == wanted[-1]:
            break
        nxt = torch.empty_like(after)
        for rows in torch.arange(V, device=dev).split(chunk):
            alone[rows] = prefix.layers(alone[rows], zero, None, layer, layer + 1)
            n = len(rows)
            x = torch.cat([after[:1], after[1 + rows]])[None]  # (1, 1 + n, C)
            y = prefix.layers(x, pos[:, :1 + n], packed_mask(1, n).to(dev), layer, layer + 1)
            nxt[0], nxt[1 + rows] = y[0, 0], y[0, 1:]
        after = nxt
        if progress is not None:
            progress(layer + 1, wanted[-1])
    return out
