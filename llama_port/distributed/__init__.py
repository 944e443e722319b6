"""llama_port on torch.distributed (torch.distributed is imported when used).

Tensor parallelism (tensor_parallel.py): ``LlamaForCausalLM.from_pretrained(path, tp_plan="auto")``
under torchrun loads each rank's slices only and returns the model sharded by transformers' plan;
``parallelize(model, mesh)`` shards a model already built.

FSDP2 fine-tuning (fsdp.py): ``shard_model(model)`` puts ``fully_shard`` on every decoder layer and
on the root; ``save_full_checkpoint`` (what ``model.save_pretrained`` runs on a sharded model)
gathers the full weights and writes them from rank 0.
"""

from __future__ import annotations

from .fsdp import save_full_checkpoint, shard_model
from .tensor_parallel import (
    TP_PLAN,
    TP_PLANS,
    check_tp_size,
    init_process_group_from_env,
    is_distributed,
    parallelize,
    tensor_parallel_mesh,
    valid_tp_sizes,
)

__all__ = [
    "TP_PLAN",
    "TP_PLANS",
    "check_tp_size",
    "init_process_group_from_env",
    "is_distributed",
    "parallelize",
    "save_full_checkpoint",
    "shard_model",
    "tensor_parallel_mesh",
    "valid_tp_sizes",
]
