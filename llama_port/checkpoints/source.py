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
    tensor_files: transformers name -> the file holding it, where the reader knows (error messages).
    iter_rank_groups: None, or ``iter_rank_groups(rank, world_size, shard_dim)``, iter_groups for
        one rank of a tensor-parallel load: a tensor stored split the way the load splits it
        (``shard_dim(name)``: the dimension, None when replicated) comes as that rank's piece alone,
        the rest whole. Meta's consolidated.*.pth files, one per model-parallel rank, have it.
    owns_tensors: True when the loader may keep the yielded tensors as the model's parameters
        instead of copying them: each is contiguous and referenced nowhere else, either freshly
        made or a view of a private (copy-on-write) memory map of a file that is only ever replaced,
        never rewritten in place (safetensors shards: save_pretrained writes a new file and renames).
    """

    format: str
    root: Path
    config: LlamaConfig
    iter_groups: Callable[[], Iterator[dict[str, Tensor]]]
    num_groups: int
    dtype: torch.dtype
    files: list[Path] = field(default_factory=list)
    tokenizer_files: list[Path] = field(default_factory=list)
    tensor_files: dict[str, Path] = field(default_factory=dict)
    owns_tensors: bool = False
    iter_rank_groups: Callable[[int, int, Callable[[str], int | None]], Iterator[dict[str, Tensor]]] | None = None

    @property
    def location(self) -> Path:
        """The path naming this checkpoint: a GGUF's file (its folder may hold others), else ``root``."""
        return self.files[0] if self.format == "gguf" else self.root

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name`` when known, else the checkpoint's root (for messages)."""
        return self.tensor_files.get(name, self.root)
