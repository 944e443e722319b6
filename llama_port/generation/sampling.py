"""Sampling filters for generate(), in transformers' order: temperature -> top-k -> top-p -> sample
(processors.py wraps them, with min-p, as transformers' warpers and applies them in that order).

Each filter maps float32 logits (B, V) to logits (B, V) with the removed tokens at -inf, as
transformers' LogitsWarpers do, so a seeded sampler draws from the same distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature: below 1 sharpens the distribution, above 1 flattens it
    (transformers' TemperatureLogitsWarper). temperature must be > 0."""
    return logits / temperature


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Logits (B, V) with all but each row's ``top_k`` largest set to -inf; values tied with the
    k-th largest are kept too (transformers' TopKLogitsWarper). top_k >= V leaves them unchanged."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019): logits (B, V) with all but the smallest set of most
    likely tokens whose cumulative probability reaches ``top_p`` set to -inf. The most likely token
    always stays. As transformers' TopPLogitsWarper: sorted ascending, the tail whose total mass is
    at most 1 - top_p goes."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)  # (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # at least one token
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def sample_token(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row (B,), drawn from softmax(logits (B, V)) with ``generator``'s RNG."""
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
