"""CheckpointSource: a checkpoint found on disk, described in transformers' names, not yet read.

Every format reader (hub safetensors/.bin, Meta consolidated.*.pth, GGUF) turns a path into one of
these; the loader turns any of them into a model the same way, so the model never knows the format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..configuration import LlamaConfig


@dataclass
class CheckpointSource:
    """format: "safetensors", "bin", "meta" or "gguf". root: the folder holding it.

    iter_groups(): yields dicts {transformers_name: tensor} with every layout transform already
        applied (Q/K permutations undone, model-parallel shards merged, quantized blocks
        dequantized); one dict per file for Hub shards, per layer or file elsewhere. Tensors may be
        memory-mapped; the loader copies them into place and converts the dtype.
    num_groups: how many dicts iter_groups yields (the progress bar's total).
    dtype: the checkpoint's own floating dtype (what dtype="auto" loads as).
    tokenizer_files: files to copy next to a converted checkpoint (tokenizer.json, ...).
    """

    format: str
    root: Path
    config: LlamaConfig
    iter_groups: Callable[[], Iterator[dict[str, Tensor]]]
    num_groups: int
    dtype: torch.dtype
    files: list[Path] = field(default_factory=list)
    tokenizer_files: list[Path] = field(default_factory=list)
