"""The inputs a parity check runs on: prompts and seeded random rows, left-padded into one batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which green plants turn sunlight into",
)
RANDOM_BATCH_SEED = 0


def random_batch(
    vocab_size: int, batch: int, seq_len: int, pad_token_id: int, seed: int = RANDOM_BATCH_SEED
) -> list[Tensor]:
    """``batch`` rows of random token ids (1-D, real tokens only), seeded; row i is shorter than
    ``seq_len`` by a different number of would-be pads (0 .. seq_len // 2, distinct while the
    range allows), so that left-padding them into one (batch, seq_len) tensor pads each row
    differently."""
    generator = torch.Generator().manual_seed(seed)
    choices = seq_len // 2 + 1
    pads = torch.cat([torch.randperm(choices, generator=generator) for _ in range(-(-batch // choices))])
    return [torch.randint(0, vocab_size, (seq_len - int(p),), generator=generator) for p in pads[:batch]]


def left_pad(rows: Sequence[Tensor], pad_token_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """1-D token rows -> input_ids, attention_mask (B, L), left-padded to ``length`` (default: the
    longest row)."""
    length = max(len(r) for r in rows) if length is None else length
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            input_ids[i, -len(row) :] = row
            attention_mask[i, -len(row) :] = 1
    return input_ids, attention_mask




def parity_batch(
    prompts: Sequence[str], tokenizer: Any | None, vocab_size: int, pad_token_id: int | None, batch: int, seq_len: int
) -> tuple[Tensor, Tensor, Tensor | None, list[str]]:
    """The tokenized prompts and ``batch`` random rows of up to ``seq_len`` tokens, left-padded
    into one batch -> (input_ids (B, L), attention_mask (B, L), the greedy prompt (1, T) or None
    without a tokenizer, notes). ValueError for a prompt that tokenizes to nothing, or no rows."""
    notes: list[str] = []
    pad = pad_token_id if pad_token_id is not None else 0
    rows: list[Tensor] = []
    generation_ids = None
    if tokenizer is not None:
        for text in prompts:
            ids = tokenizer(text)["input_ids"]
            if not ids:
                raise ValueError(f"--prompt {text!r} tokenizes to no tokens")
            rows.append(torch.tensor(ids, dtype=torch.long))
        generation_ids = rows[0][None]  # (1, T)
    else:
        notes.append("the checkpoint ships no tokenizer: prompts skipped, random tokens only")
        if batch == 0:
            raise ValueError("the checkpoint has no tokenizer for the prompts; use --batch >= 1")
    random_rows = random_batch(vocab_size, batch, seq_len, pad)
    length = max([seq_len if random_rows else 0] + [len(r) for r in rows])
    input_ids, attention_mask = left_pad(rows + random_rows, pad, length)
    return input_ids, attention_mask, generation_ids, notes
