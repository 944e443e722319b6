"""llama_port on torch.distributed.

Tensor parallelism (tensor_parallel.py): ``LlamaForCausalLM.from_pretrained(path, tp_plan="auto")``
under torchrun loads each rank's slices only and returns the model sharded by transformers' plan;
``parallelize(model, mesh)`` shards a model already built. torch.distributed is imported when used.
"""

from __future__ import annotations

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
    "tensor_parallel_mesh",
    "valid_tp_sizes",
]
