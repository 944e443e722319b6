"""Why a checkpoint could not be read: one exception type per kind of bad input.

Every error is a ``CheckpointError`` and also a ``ValueError`` or ``FileNotFoundError``, so callers
that only know the built-in types (the CLI maps both to exit code 2) still catch them. Messages
name the file (or repo id) and the problem, e.g. ``"/ckpt/model-00002-of-00003.safetensors: file is
truncated: ..."``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class CheckpointError(Exception):
    """Base of every checkpoint-reading error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A path, repo id, config file or weights file that should be there is not."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A file is there but unreadable: truncated, bad header, not the format its name says."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """A file that would run code on load (a pickle with globals), or an index pointing outside its folder."""


class UnsupportedCheckpointError(CheckpointError, ValueError):
    """A well-formed checkpoint of something we do not load: another architecture, a quant type, a format."""


class ShapeMismatchError(CheckpointError, ValueError):
    """A tensor whose shape is not what the config says it must be."""


class KeysError(CheckpointError, ValueError):
    """Base of the missing / unexpected tensor name errors; ``keys`` holds the names."""

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.keys = sorted(keys)


class MissingKeysError(KeysError):
    """Tensors the model needs that the checkpoint lacks."""


class UnexpectedKeysError(KeysError):
    """Tensors in the checkpoint that the model has no place for (``strict=False`` allows them)."""


@contextmanager
def refused_as_corrupt(path: str | Path) -> Iterator[None]:
    """A ValueError in the block (LlamaConfig refusing a value read from ``path``) becomes a
    CorruptCheckpointError naming the file; CheckpointErrors pass through as they are."""
    try:
        yield
    except CheckpointError:
        raise
    except ValueError as err:
        raise CorruptCheckpointError(f"{path}: {err}") from err


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def format_keys(keys: Iterable[str], limit: int = 20) -> str:
    """``['a', 'b', ...]`` with at most ``limit`` names and a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "KeysError",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnexpectedKeysError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "first_line",
    "format_keys",
    "refused_as_corrupt",
]
