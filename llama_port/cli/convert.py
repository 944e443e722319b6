"""``llama-port convert``: any readable checkpoint to a Hub-format folder (checkpoints.convert_checkpoint)."""

from __future__ import annotations

import argparse

from ..checkpoints import convert_checkpoint
from ..dtypes import COMPUTE_DTYPES
from .common import CHECKPOINT_HELP

NAME = "convert"
HELP = "write any supported checkpoint as a Hub-format folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint to read (" + CHECKPOINT_HELP.split(";")[0] + ")")
    parser.add_argument("dst", help="output folder (config.json, sharded safetensors, tokenizer files)")
    parser.add_argument("--dtype", choices=("auto", *COMPUTE_DTYPES), default="auto",
                        help="dtype of the written weights (auto: the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty DST as a whole (every file in it, once the new checkpoint "
                             "is complete); without it a non-empty DST is refused")


def run(args: argparse.Namespace) -> int:
    written = convert_checkpoint(
        args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )
    print(f"wrote {written}")
    return 0
