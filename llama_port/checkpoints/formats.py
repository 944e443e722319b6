"""The checkpoint format registry: which reader reads a local file or folder.

Each :class:`CheckpointFormat` says which files and folders it claims and reads them into a
CheckpointSource; the first format in ``FORMATS`` that claims a path reads it. A new format is a
reader module and one entry here.

- Hub (hub.py): a folder with config.json and safetensors / pytorch_model.bin weights, or one of
  its weights files (.safetensors, .bin, an .index.json);
- Meta (meta.py): a folder with params.json + consolidated.*.pth, or with an ``original/``
  subfolder holding them, or one of those files (Hub-format weights win when a folder has both);
- GGUF (gguf.py): a .gguf file (or a file with GGUF's magic bytes), or a folder holding exactly one
  (and neither of the above).

A config.json names its folder. A folder no format claims is refused naming what was looked for.
Readers are looked up in their modules at call time (``meta.read_meta_checkpoint``), so a test
can stand in for one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..configuration import CONFIG_NAME
from . import gguf, hub, meta
from .errors import CheckpointNotFoundError, UnsupportedCheckpointError
from .source import CheckpointSource


@dataclass(frozen=True)
class CheckpointFormat:
    """A reader and the paths it claims. claims_file / claims_folder get an existing path."""

    name: str
    claims_file: Callable[[Path], bool]
    claims_folder: Callable[[Path], bool]
    read: Callable[[Path], CheckpointSource]


def _read_hub(path: Path) -> CheckpointSource:
    return hub.read_hub_checkpoint(path) if path.is_dir() else hub.read_hub_checkpoint(path.parent, weights_file=path)


def _single_gguf(folder: Path) -> Path | None:
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


FORMATS: list[CheckpointFormat] = [
    CheckpointFormat(
        "hub",
        claims_file=lambda path: path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"),
        claims_folder=lambda folder: (folder / CONFIG_NAME).is_file() and hub.find_weights_file(folder) is not None,
        read=_read_hub,
    ),
    CheckpointFormat(
        "meta",
        claims_file=lambda path: path.suffix == ".pth" or path.name == "params.json",
        claims_folder=lambda folder: meta.is_meta_checkpoint(folder),
        read=lambda path: meta.read_meta_checkpoint(path if path.is_dir() else path.parent),
    ),
    CheckpointFormat(
        "gguf",
        claims_file=lambda path: path.suffix == ".gguf" or gguf.is_gguf_file(path),
        claims_folder=lambda folder: _single_gguf(folder) is not None,
        read=lambda path: gguf.read_gguf_checkpoint(path if path.is_file() else _single_gguf(path)),
    ),
]


def read_local_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """The CheckpointSource of a local file or folder, read by the first format claiming it."""
    path = Path(path)
    if path.is_file():
        if path.name == CONFIG_NAME:
            return read_local_checkpoint(path.parent)
        for fmt in FORMATS:
            if fmt.claims_file(path):
                return fmt.read(path)
        raise UnsupportedCheckpointError(
            f"{path}: not a checkpoint file llama_port reads; expected a .gguf file, a .safetensors / .bin "
            f"(with config.json beside it), config.json, params.json, or a folder holding them"
        )
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: no such file or folder")
    for fmt in FORMATS:
        if fmt.claims_folder(path):
            return fmt.read(path)
    if (path / CONFIG_NAME).is_file():
        return hub.read_hub_checkpoint(path)  # raises, naming the weights files a config.json needs
    count = len(list(path.glob("*.gguf")))
    raise CheckpointNotFoundError(
        f"{path}: no {CONFIG_NAME} (Hub format) or params.json + consolidated.*.pth (Meta format, here or in "
        f"{path / 'original'}) in this folder" + (f"; it holds {count} .gguf files: pass one" if count else "")
    )
