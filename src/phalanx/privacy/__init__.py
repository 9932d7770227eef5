"""Privacy: inversion attacks on what an untrusted stage receives, defenses at the cut, and
leakage metrics.

Attacks (each states its attacker model): :func:`nearest_embedding`, :class:`ExactSearch`
(SipIt-style exact layer-wise search, ranked by
:class:`TableRanker`), :class:`InversionDecoder` (learned on public text),
and gradient inversion (:mod:`phalanx.privacy.gradients`). Defenses: :func:`add_noise`,
:class:`DPForward` (with Opacus accounting), :class:`NoisyCut`. Metrics: :func:`leakage`.
"""

from phalanx.privacy.cut import Prefix, cut_hidden, validate_cut, validate_sigma
from phalanx.privacy.decoder import InversionDecoder, decoder_pairs, fit_decoder, train_decoder
from phalanx.privacy.embedding import embedding_scores, nearest_embedding
from phalanx.privacy.gradients import (
    labels_from_head_grad,
    labels_from_logit_grad,
    labels_from_stage_grad,
    layer_input_candidates,
    public_head,
    rowspace_scores,
    tokens_from_weight_grad,
)
from phalanx.privacy.metrics import (
    exact_sequence_match,
    leakage,
    rouge_l,
    token_f1,
    token_recovery,
)
from phalanx.privacy.noise import DPForward, NoisyCut, add_noise, clip_tokens, gaussian_cut
from phalanx.privacy.search import ExactSearch, SearchResult, TableRanker
from phalanx.privacy.table import context_free_tables
from phalanx.privacy.victim import finetuned_copy, perturbed_copy

__all__ = [
    "DPForward",
    "ExactSearch",
    "InversionDecoder",
    "NoisyCut",
    "Prefix",
    "SearchResult",
    "TableRanker",
    "add_noise",
    "clip_tokens",
    "context_free_tables",
    "cut_hidden",
    "decoder_pairs",
    "embedding_scores",
    "exact_sequence_match",
    "finetuned_copy",
    "fit_decoder",
    "gaussian_cut",
    "labels_from_head_grad",
    "labels_from_logit_grad",
    "labels_from_stage_grad",
    "layer_input_candidates",
    "leakage",
    "nearest_embedding",
    "perturbed_copy",
    "public_head",
    "rouge_l",
    "rowspace_scores",
    "token_f1",
    "token_recovery",
    "tokens_from_weight_grad",
    "train_decoder",
    "validate_cut",
    "validate_sigma",
]
