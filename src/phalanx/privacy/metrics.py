"""How much of a text an attack recovered: token rate, exact match, bag-of-tokens F1, ROUGE-L.

Every metric takes one predicted and one true sequence of token ids (lists or 1-D tensors) and
returns a float in [0, 1]; :func:`leakage` averages all four over many sequences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

Tokens = Sequence[int] | torch.Tensor


def _ids(x: Tokens) -> list[int]:
    return [int(i) for i in (x.reshape(-1).tolist() if isinstance(x, torch.Tensor) else x)]


def token_recovery(pred: Tokens, true: Tokens) -> float:
    """Share of positions of ``true`` where ``pred`` holds the same token (missing ones wrong)."""
    p, t = _ids(pred), _ids(true)
    if not t:
        return 1.0 if not p else 0.0
    return sum(a == b for a, b in zip(p, t, strict=False)) / len(t)


def exact_sequence_match(pred: Tokens, true: Tokens) -> float:
    """1.0 if ``pred`` is exactly ``true``, else 0.0."""
    return float(_ids(pred) == _ids(true))


def _f1(overlap: int, n_pred: int, n_true: int) -> float:
    if n_pred == 0 and n_true == 0:
        return 1.0
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_true
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: Tokens, true: Tokens) -> float:
    """F1 of the multisets of tokens (order ignored), as SQuAD scores answers."""
    p, t = _ids(pred), _ids(true)
    overlap = sum((Counter(p) & Counter(t)).values())
    return _f1(overlap, len(p), len(t))


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: Tokens, true: Tokens) -> float:
    """ROUGE-L F1: the LCS's precision and recall combined (beta = 1)."""
    p, t = _ids(pred), _ids(true)
    return _f1(lcs_length(p, t), len(p), len(t))


METRICS = {
    "token_recovery": token_recovery,
    "exact_match": exact_sequence_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def leakage(preds: Sequence[Tokens], trues: Sequence[Tokens]) -> dict[str, float]:
    """Each metric averaged over pairs of predicted and true sequences."""
    if len(preds) != len(trues):
        raise ValueError(f"{len(preds)} predictions for {len(trues)} true sequences")
    if not trues:
        return {name: 0.0 for name in METRICS}
    return {name: sum(fn(p, t) for p, t in zip(preds, trues, strict=True)) / len(trues)
            for name, fn in METRICS.items()}
