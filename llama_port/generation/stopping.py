"""End-of-sequence ids (the one normaliser every caller, generate, the CLI and parity, uses) and
the stop-string criterion."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def eos_token_ids(ids: int | Sequence[int] | Tensor | None, *more: int | None) -> list[int]:
    """An eos id, a list of them, a tensor of them or None -> a list of distinct ints, in order;
    ``more`` appends further ids (a tokenizer's eos_token_id, which may be None) when new.

    ``eos_token_ids([128001, 128009]) == [128001, 128009]``; ``eos_token_ids(None) == []``.
    """
    if ids is None:
        values: Iterable = []
    elif isinstance(ids, Tensor):
        values = ids.flatten().tolist()
    elif isinstance(ids, int):
        values = [ids]
    else:
        values = ids
    out: list[int] = []
    for value in [*values, *more]:
        if value is not None and int(value) not in out:
            out.append(int(value))
    return out


def until_eos(tokens: list[int], eos_ids: Iterable[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence id (what follows it is padding)."""
    eos = set(eos_ids)
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1)
    return tokens[: end + 1]


class StopStrings:
    """Stopping criterion: True for each row (B,) whose text holds a stop string that overlaps the
    last token, as transformers' StopStringCriteria: for "stop", the tokens ["st", "op"],
    ["st", "opera"] and ["las", "topper"] stop; ["stop", "at"] does not (the match was complete one
    token earlier). A match may start in the prompt, as there. Decodes with ``tokenizer.decode``
    only the last tokens that can hold a match: each token is at least one character, plus one for
    a character split across tokens."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.window = max(len(s) for s in self.stop_strings) + 2  # tokens

    def __call__(self, input_ids: Tensor, scores: Any) -> Tensor:
        stops = []
        for row in input_ids[:, -self.window :].tolist():
            text = self.tokenizer.decode(row)
            before = len(self.tokenizer.decode(row[:-1]))  # where the last token's text starts
            stops.append(any(text.find(s, max(0, before - len(s) + 1)) >= 0 for s in self.stop_strings))
        return torch.tensor(stops, device=input_ids.device)
