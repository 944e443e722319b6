"""FSDP2 fine-tuning: PyTorch's own ``torch.distributed.fsdp.fully_shard`` on a llama_port model, and
the save path that gathers its full state dict into a checkpoint transformers loads.

``shard_model``: one FSDP unit per ``LlamaDecoderLayer`` (its parameters all-gathered in one
collective before its forward, freed after, gradients reduce-scattered in backward), then one for the
root, which holds the rest: the embedding, the final norm and the head. A tied head shares its
Parameter with the embedding; both sit in the root unit, so the tie survives sharding (one DTensor
under both names). Parameters become DTensors sharded on dim 0 over the mesh; an optimizer built
afterwards holds sharded state. Everything else (the loss, ``gradient_checkpointing_enable()``,
``generate``) is the model's own code, unchanged.

``save_full_checkpoint`` (also what ``model.save_pretrained(folder)`` runs when the parameters are
DTensors): a collective. Every rank gathers the full state dict (DCP's ``get_model_state_dict``,
``full_state_dict=True, cpu_offload=True``: only rank 0 receives it, in CPU memory), rank 0 writes it
through ``checkpoints.saving.save_pretrained`` (the atomic folder writer), and every rank returns once
the folder is complete, or raises if rank 0's write failed.

torch.distributed is imported when a function here is called, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..modeling import LlamaDecoderLayer
from .tensor_parallel import default_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["save_full_checkpoint", "shard_model"]

ROOT_UNIT = "the root"


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    reshard_after_forward: bool | int = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """Apply FSDP2 (``fully_shard``) to every ``LlamaDecoderLayer`` of ``model``, then to ``model``
    itself (the root unit: embedding, final norm, head); returns ``model``, now an ``FSDPModule``.

    Call it on every rank, after ``torch.distributed.init_process_group`` and before building the
    optimizer (it must see the sharded parameters). ``model``: a LlamaForCausalLM or a LlamaModel
    with its weights loaded, on the CPU or already on the mesh's device; every rank must hold the
    same weights (each keeps only its shard of them).

    mesh: a 1-D DeviceMesh (FSDP) or 2-D (HSDP, replicate x shard); default
        ``init_device_mesh(device_type, (world_size,))`` where device_type is "cuda" when the default
        process group's backend includes nccl (set ``torch.cuda.set_device(LOCAL_RANK)`` first) and
        "cpu" otherwise (gloo). Parameters move to the mesh's device.
    reshard_after_forward: for the decoder layers, fully_shard's meaning: True frees each layer's
        gathered parameters after its forward and gathers them again in backward (least memory);
        False keeps them to backward (one all-gather fewer per layer); an int shards them over that
        many ranks in between. The root unit uses fully_shard's default for a root (kept, since
        backward needs the head first).
    mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 params, fp32 reduce)
        for every unit; None: compute and reduce in the parameters' dtype.

    ValueError: ``model`` is not an nn.Module, holds no LlamaDecoderLayer, is already sharded, or
    shares a parameter between two units (a layer and the root, or two layers); an argument of the
    wrong type. RuntimeError: torch.distributed is not initialized.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}; expected an nn.Module holding LlamaDecoderLayer modules")
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        raise ValueError("model is already sharded (it holds FSDPModule units); call shard_model once per model")
    layers = [module for module in model.modules() if isinstance(module, LlamaDecoderLayer)]
    if not layers:
        raise ValueError(f"model={type(model).__name__} holds no LlamaDecoderLayer; expected a llama_port model")
    if not isinstance(reshard_after_forward, bool) and not (
        isinstance(reshard_after_forward, int) and reshard_after_forward >= 2
    ):
        raise ValueError(
            f"reshard_after_forward={reshard_after_forward!r}; expected True, False or an int >= 2 (ranks to "
            "reshard over between forward and backward)"
        )
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise ValueError(
            f"mp_policy={type(mp_policy).__name__}; expected None or a torch.distributed.fsdp.MixedPrecisionPolicy"
        )
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise ValueError(f"mesh={type(mesh).__name__}; expected None or a torch.distributed DeviceMesh (init_device_mesh)")
    shared = _parameters_by_unit(model, layers)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard_model: torch.distributed is not initialized; launch with torchrun and call "
            "torch.distributed.init_process_group() first"
        )

    mesh = default_mesh() if mesh is None else mesh
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, **policy)
    fully_shard(model, mesh=mesh, **policy)
    # Internal invariant: FSDP2 registers one DTensor under every name a shared Parameter had.
    for names in shared:
        tensors = [model.get_parameter(name) for name in names]
        assert all(t is tensors[0] for t in tensors), f"tie lost by fully_shard: {names}"
    return model


def save_full_checkpoint(
    model: nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
) -> Path:
    """Write the sharded ``model``'s full weights to ``save_directory`` as ``save_pretrained`` does
    (config.json, generation_config.json, safetensors shards past ``max_shard_size``, a tied head not
    written), in a folder transformers' ``from_pretrained`` reads.

    A collective: call it on every rank. Each rank takes part in gathering the full state dict; rank 0
    alone holds it (in CPU memory) and writes it, atomically (the folder holds the old checkpoint or
    the new one, never a mix); every rank returns the folder once it is complete. If rank 0's write
    fails, rank 0 raises its error and every other rank a RuntimeError quoting it. Without an
    initialized process group it is plain ``save_pretrained``.
    """
    import torch.distributed as dist

    from ..checkpoints.saving import save_pretrained

    options = {"max_shard_size": max_shard_size, "safe_serialization": safe_serialization}
    if not dist.is_available() or not dist.is_initialized():
        return save_pretrained(model, save_directory, **options)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            save_pretrained(model, save_directory, state_dict=state, **options)
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then re-raised here
            failure = err
    del state
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(outcome, src=0)  # also the barrier: no rank returns before the folder is complete
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"save_full_checkpoint({str(save_directory)!r}): rank 0 failed to write: {outcome[0]}")
    return Path(save_directory)


def _parameters_by_unit(model: nn.Module, layers: list[nn.Module]) -> list[list[str]]:
    """The names of each Parameter shared under several names (a tied head: [embed_tokens.weight,
    lm_head.weight]); ValueError when one is shared across FSDP units (a decoder layer and the root,
    or two layers), which fully_shard cannot keep tied."""
    unit_of_module = {id(m): index for index, layer in enumerate(layers) for m in layer.modules()}
    names: dict[int, list[str]] = {}
    units: dict[int, set[int | str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(name.rpartition(".")[0])
        names.setdefault(id(param), []).append(name)
        units.setdefault(id(param), set()).add(unit_of_module.get(id(owner), ROOT_UNIT))
    for key, owners in units.items():
        if len(owners) > 1:
            raise ValueError(
                f"parameter {names[key][0]!r} is shared with {names[key][1:]} across FSDP units "
                f"(layers and root: {sorted(map(str, owners))}); shard_model keeps a shared parameter in one "
                "unit: tie only parameters outside the decoder layers (the embedding and the head)"
            )
    return [group for group in names.values() if len(group) > 1]
