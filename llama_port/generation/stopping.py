"""End-of-sequence ids: the one normaliser every caller (generate, the CLI, parity) uses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
