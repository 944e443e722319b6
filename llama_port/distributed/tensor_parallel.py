"""Tensor parallelism with DTensor: transformers' plan for LLaMA, the mesh, the head-count check,
and the per-rank pieces a sharded load puts in place.

The plan (``TP_PLAN``, transformers' ``base_model_tp_plan`` for Llama): q/k/v/gate/up are split
column-wise (their output features, ``Shard(0)`` of the weight), o/down row-wise (their input
features, ``Shard(1)``), so each decoder layer costs two all-reduces (after o_proj and after
down_proj) and nothing else talks. Every column-wise output is handed on as the rank's plain local
tensor (``use_local_output=True``): attention's ``view(B, T, -1, D)`` then sees H / N query heads and
Hkv / N key/value heads, and because query head h reads key/value head h // (H / Hkv), a rank's
contiguous block of query heads is exactly the block of whole GQA groups its key/value heads
serve; the backends and both KV caches work on local heads unchanged.

The embedding, the norms and lm_head stay replicated (plain tensors on every rank). A vocab-parallel
embedding and head would save (N - 1) / N of the vocabulary's rows per rank, but need an all-gather
of the logits (or a distributed softmax) each step and break tied embeddings into a DTensor shared
by two differently sharded modules; replicated, every rank computes bit-identical logits from the
all-reduced hidden state, so a tied head stays one tensor and generation samples the same token on
every rank from the same seed with no extra communication.

torch.distributed is imported where it is used, never when llama_port is imported.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch
from torch import Tensor, nn

# Module (relative to a decoder layer) -> how it is split; transformers' names for the styles.
TP_PLAN: dict[str, str] = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}
TP_PLANS = ("auto",)  # tp_plan= values: "auto" is TP_PLAN
MESH_DIM = "tp"  # the dimension of a multi-dimensional device_mesh that tensor parallelism uses


# -------------------------------------------------------------------------------- the size check
def valid_tp_sizes(config: Any) -> list[int]:
    """The tensor-parallel sizes this config splits evenly: the common divisors of
    num_attention_heads, num_key_value_heads and intermediate_size."""
    common = math.gcd(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    return [n for n in range(1, common + 1) if common % n == 0]


def check_tp_size(config: Any, tp_size: int) -> None:
    """ValueError, naming both head counts, intermediate_size and the sizes that work, when
    ``tp_size`` does not divide them all: called before any weight is read, so an impossible split
    never reaches the forward pass."""
    if tp_size in valid_tp_sizes(config):
        return
    raise ValueError(
        f"tensor parallel size {tp_size} does not split this model: num_attention_heads="
        f"{config.num_attention_heads}, num_key_value_heads={config.num_key_value_heads} and "
        f"intermediate_size={config.intermediate_size} must all be divisible by it (whole heads, and whole "
        f"GQA groups, on each rank); sizes that work: {valid_tp_sizes(config)}"
    )


# ----------------------------------------------------------------------------------------- mesh
def init_process_group_from_env(device_type: str | None = None) -> None:
    """The default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), when none is initialised yet: nccl for ``device_type`` "cuda" (each process on
    cuda:LOCAL_RANK), gloo for "cpu"; None: "cuda" when CUDA is available. ValueError outside torchrun."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise ValueError(
            f"tp_plan='auto' needs a torch.distributed launch, but {missing} are not set: run under "
            "torchrun --nproc-per-node N (or initialise the default process group yourself)"
        )
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"tensor parallel on device type {device_type!r}; expected 'cuda' (nccl) or 'cpu' (gloo)")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def tensor_parallel_mesh(tp_plan: str | None, device_mesh: Any = None) -> Any:
    """The 1-D DeviceMesh a tensor-parallel load shards over.

    tp_plan: "auto" (TP_PLAN) or None when ``device_mesh`` is given. device_mesh: a DeviceMesh
    (1-D, or with a dimension named "tp", which is used); default: every process of the default
    group (initialised from torchrun's environment if needed) on this process's device type."""
    if tp_plan is not None and tp_plan not in TP_PLANS:
        raise ValueError(f"tp_plan={tp_plan!r}; expected one of {list(TP_PLANS)} (transformers' plan for Llama)")
    if device_mesh is None:
        init_process_group_from_env()
        return default_mesh(MESH_DIM)
    names = device_mesh.mesh_dim_names or ()
    if device_mesh.ndim == 1:
        return device_mesh
    if MESH_DIM in names:
        return device_mesh[MESH_DIM]
    raise ValueError(
        f"device_mesh has {device_mesh.ndim} dimensions {names}; pass a 1-D mesh or one with a dimension named "
        f"{MESH_DIM!r} (tensor parallelism shards over it)"
    )


def default_mesh(dim_name: str | None = None) -> Any:
    """A 1-D DeviceMesh over every process of the (initialised) default group, named ``dim_name``:
    on CUDA when the group's backend includes nccl (each process on its current device), else on
    the CPU (gloo). The one place tensor parallelism and FSDP2 pick their default mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    names = None if dim_name is None else (dim_name,)
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=names)


def mesh_device(mesh: Any) -> torch.device:
    """The device this process's shards live on: the current CUDA device for a CUDA mesh, else the mesh's type."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


# ---------------------------------------------------------------------------------- parallelize
def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model`` (a LlamaForCausalLM or LlamaModel) over ``mesh`` by TP_PLAN, in place;
    returns it, with ``model.device_mesh`` set (the 1-D mesh used). mesh: as tensor_parallel_mesh's
    device_mesh (None: every process of the default group).

    Planned Linear weights (and column-wise biases) become DTensors holding this rank's 1 / N;
    row-wise biases are replicated DTensors; everything else is untouched (plain, replicated).
    A model on the meta device (the loader's) is split locally with no communication; a model with
    real weights gets rank 0's pieces (scattered), so every rank ends up with rank 0's model.
    ValueError (check_tp_size) when the heads or intermediate_size do not split over the mesh."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = tensor_parallel_mesh(None, mesh)
    check_tp_size(model.config, mesh.size())
    on_meta = any(p.is_meta for p in model.parameters())
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.get_decoder().layers:
        plan = {}
        for module_name, style_name in TP_PLAN.items():
            style = styles[style_name]()  # output handed on as the local tensor (use_local_output)
            style.src_data_rank = None if on_meta else 0  # None: split locally, no scatter
            plan[module_name] = style
        parallelize_module(layer, mesh, plan)
    model.device_mesh = mesh
    return model


# ---------------------------------------------------------------------------- sharded parameters
def is_distributed(tensor: Tensor) -> bool:
    """True for a DTensor (without importing torch.distributed.tensor when nothing made one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def shard_dim(param: Tensor) -> int | None:
    """The dimension a DTensor parameter is split along on its 1-D mesh; None when replicated or plain."""
    if not is_distributed(param):
        return None
    placement = param.placements[0]
    return placement.dim if placement.is_shard() else None


def accepted_shapes(param: Tensor) -> set[tuple[int, ...]]:
    """Shapes a checkpoint tensor for ``param`` may have: its (global) shape, and for a DTensor also
    this rank's local shape (a reader that yields this rank's piece alone, as Meta's files do)."""
    shapes = {tuple(param.shape)}
    if is_distributed(param):
        shapes.add(tuple(param.to_local().shape))
    return shapes


def local_parameter(param: Tensor, tensor: Tensor, device: torch.device) -> Tensor:
    """The DTensor for meta DTensor ``param`` holding this rank's piece of ``tensor`` on ``device``,
    in ``param``'s dtype.

    ``tensor``: the whole weight (a memory-mapped view: only this rank's rows or columns are copied
    out of it, so the whole weight never exists in memory) or already this rank's piece. The piece
    is a fresh tensor of its own size: no storage of a whole sharded weight is kept."""
    from torch.distributed.tensor import DTensor

    mesh = param.device_mesh
    local_shape = tuple(param.to_local().shape)
    piece = tensor
    dim = shard_dim(param)
    if tuple(tensor.shape) != local_shape:
        assert dim is not None and tensor.shape[dim] == local_shape[dim] * mesh.size(), (tensor.shape, local_shape)
        piece = tensor.narrow(dim, mesh.get_local_rank() * local_shape[dim], local_shape[dim])  # (rows or columns of this rank)
    value = torch.empty(local_shape, dtype=param.dtype, device=device)
    value.copy_(piece)  # reads only the piece's bytes; converts the dtype
    return DTensor.from_local(value, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())

