"""GenerateOutput: what generate(return_dict_in_generate=True) returns, with the field names and
the access of transformers' GenerateDecoderOnlyOutput (a ModelOutput)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor


@dataclass
class GenerateOutput:
    """sequences: prompt plus new tokens (B, T + N). scores / logits: one (B, V) float32 tensor per
    new token, after the processors and warpers / as the model gave them; None unless asked for
    (output_scores / output_logits).

    As a ModelOutput: attribute, key (``out["sequences"]``) and integer access (``out[0]``), with
    the None fields skipped by keys(), items(), to_tuple() and integer indices.
    """

    sequences: Tensor
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value for _, value in self.items())

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())
