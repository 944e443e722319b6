"""Logits processors: each maps (input_ids (B, S), scores (B, V) float32) -> scores (B, V), as
transformers' LogitsProcessor callables do, so the user's own transformers processors mix with ours.

transformers' order (GenerationMixin._get_logits_processor), which generate() follows:
  1. repetition penalty (RepetitionPenaltyLogitsProcessor; the left padding is not penalised)
  2. min_length / min_new_tokens (MinLength / MinNewTokensLengthLogitsProcessor: eos at -inf)
  3. the caller's ``logits_processor`` callables, in their order
  4. when sampling only, the warpers: temperature -> top-k -> top-p -> min-p (sampling.py's filters)
Then the token: argmax, or a draw from softmax(scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .sampling import apply_temperature, sample_token, top_k_filter, top_p_filter

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]  # (input_ids (B, S), scores (B, V)) -> scores (B, V)


class RepetitionPenalty:
    """Scores of every token already in a row (prompt included, left padding excluded) divided by
    ``penalty`` when positive, multiplied when negative (Keskar et al. 2019; transformers'
    RepetitionPenaltyLogitsProcessor with prompt_ignore_length = each row's padding length)."""

    def __init__(self, penalty: float, padding_lengths: Tensor | None = None) -> None:
        self.penalty = penalty
        self.padding_lengths = padding_lengths  # (B,) or None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        vocab_size = scores.shape[-1]
        if self.padding_lengths is not None:
            # pads become id vocab_size, a column added below and dropped after the scatter
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(positions[None, :] < self.padding_lengths[:, None], vocab_size)
        input_ids = input_ids.clamp(max=vocab_size)
        padded = torch.nn.functional.pad(scores, (0, 1))  # (B, V + 1)
        score = torch.gather(padded, 1, input_ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return padded.scatter(1, input_ids, score)[..., :vocab_size]


class MinLength:
    """eos ids at -inf while a row is shorter than ``min_length`` tokens, prompt width included
    (transformers' MinLengthLogitsProcessor; min_new_tokens=n is min_length = prompt width + n, as
    its MinNewTokensLengthLogitsProcessor)."""

    def __init__(self, min_length: int, eos_ids: Sequence[int]) -> None:
        self.min_length = min_length
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[-1] >= self.min_length:
            return scores
        eos = torch.tensor(self.eos_ids, device=scores.device, dtype=torch.long)
        is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos)  # (V,)
        return torch.where(is_eos, -math.inf, scores)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Logits (B, V) with every token less likely than ``min_p`` times the row's most likely one set
    to -inf; the most likely always stays (Nguyen et al. 2024; transformers' MinPLogitsWarper)."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


class Warper:
    """A sampling filter ``fn(scores, value)`` as a processor (the input ids are not needed)."""

    def __init__(self, fn: Callable[[Tensor, float], Tensor], value: float) -> None:
        self.fn, self.value = fn, value

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return self.fn(scores, self.value)


def sampling_warpers(
    temperature: float, top_k: int | None, top_p: float | None, min_p: float | None
) -> list[LogitsProcessor]:
    """The warpers transformers adds when sampling, in its order, each only when it changes anything:
    temperature != 1, top_k not None / 0, top_p < 1, min_p not None."""
    warpers: list[LogitsProcessor] = []
    if temperature != 1.0:
        warpers.append(Warper(apply_temperature, temperature))
    if top_k:
        warpers.append(Warper(top_k_filter, top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(Warper(top_p_filter, top_p))
    if min_p is not None:
        warpers.append(Warper(min_p_filter, min_p))
    return warpers


def apply_processors(processors: Sequence[LogitsProcessor], input_ids: Tensor | None, scores: Tensor) -> Tensor:
    """Each processor in turn over scores (B, V), given the sequences so far (B, S) (None: warpers only)."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def next_tokens_from_logits(
    logits: Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    min_p: float | None = None,
) -> Tensor:
    """Next token per row (B,) from float32 logits (B, V): argmax, or temperature -> top-k -> top-p
    -> min-p -> sample (transformers' warper order). top_k None or 0: no top-k filter."""
    if not do_sample:
        return logits.argmax(dim=-1)
    return sample_token(apply_processors(sampling_warpers(temperature, top_k, top_p, min_p), None, logits), generator)
