"""Checkpoint -> model, memory-lean: ``from_pretrained`` and the mixin the models inherit.

The model is built on the meta device (no storage, no random init), then each checkpoint tensor
is checked against its meta parameter's shape and put in place on its device, converted to the
target dtype on the way, group by group; a tensor read freshly by its reader (safetensors) is
adopted as the parameter's storage when no conversion is needed, so a load costs about the
model's size once. The rotary frequencies (non-persistent buffers, never in a checkpoint) are
recomputed. Missing or unexpected tensors are reported before the model is returned; an error
leaves no model behind.

``device_map="auto"`` (and "balanced", "balanced_low_0", "sequential", or a dict) goes through
accelerate: infer_auto_device_map with decoder layers never split, weights for "disk" written to
``offload_folder`` as they stream by, then dispatch_model.

``tp_plan="auto"`` / ``device_mesh=`` load tensor-parallel (llama_port.distributed): the head counts
are checked against the mesh before anything is read, the meta model is sharded by the plan, and
each rank copies only its rows or columns of every sharded weight into its DTensor's local piece.
From safetensors that piece is all that is read: the reader's tensors are views of the file's
memory map (what ``safe_open(...).get_slice`` reads from too), and narrowing one copies its bytes
only. Meta files whose model-parallel count equals the mesh size give each rank its own file's piece
(see meta.py). GGUF (quantized blocks span rows) and .bin (torch.load) yield whole tensors, each
narrowed as it streams by, so one whole weight is in memory at a time.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..attention import default_attn_implementation, get_backend
from ..configuration import as_llama_config
from ..distributed.tensor_parallel import (
    accepted_shapes,
    check_tp_size,
    is_distributed,
    local_parameter,
    mesh_device,
    parallelize,
    shard_dim,
    tensor_parallel_mesh,
)
from ..dtypes import DTYPES, STORED_DTYPES, dtype_name, parse_dtype
from ..generation import GENERATION_CONFIG_NAME, GenerationConfig
from ..modeling import LlamaRotaryEmbedding
from ..quantization import (
    QUANTIZE_METHODS,
    check_method,
    convertible,
    quantize_linear,
    quantize_weights,
    read_quantization_config,
)
from .errors import (
    CorruptCheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsupportedCheckpointError,
    format_keys,
)
from .resolve import HubOptions, open_checkpoint
from .source import CheckpointSource

ACCELERATE_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
NO_SPLIT_MODULES = ["LlamaDecoderLayer"]
# Older checkpoints saved the rotary frequencies; they are recomputed from the config instead.
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq\Z")

DeviceMap = dict[str, "str | int | torch.device"]


# ---------------------------------------------------------------------------------------- loading
def load_pretrained(
    cls: type,
    name_or_path: str | os.PathLike | CheckpointSource,
    *,
    dtype: str | torch.dtype | None = "auto",
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | int | torch.device | DeviceMap | None = None,
    max_memory: dict[str | int, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    strict: bool = True,
    progress: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    config: Any = None,
    gguf_file: str | os.PathLike | None = None,
    quantization_config: Any = None,
    quantize: str | None = None,
    low_cpu_mem_usage: bool | None = None,
    trust_remote_code: bool | None = None,
    tp_plan: str | None = None,
    device_mesh: Any = None,
):
    """Load a checkpoint: a local folder or file (Hub format, Meta consolidated.*.pth, .gguf) or a Hub repo id.

    dtype: "auto" (the checkpoint's: config.json's dtype, else the weights') or a floating
        torch dtype or its name; ``torch_dtype`` is its older name.
    device: where every weight goes ("cpu", "cuda", ...). device_map: a device, or "auto" /
        "balanced" / "balanced_low_0" / "sequential" / a {module: device} dict through
        accelerate, with ``max_memory`` and ``offload_folder`` (needed when weights go to "disk").
    strict: missing or unexpected tensors raise; False initialises missing ones as a fresh model
        would and warns about both.
    progress: a bar over the checkpoint's groups; None shows it on a terminal only.
    revision, token, cache_dir, local_files_only: for a Hub repo id (HF_HUB_OFFLINE is honoured).
    config: a llama_port or transformers LlamaConfig used instead of the checkpoint's (the weights
        must fit it).
    gguf_file: transformers' way of naming a GGUF file inside the local folder ``name_or_path``
        (loading ``folder/gguf_file``); GGUF files on the Hub are not fetched.
    quantization_config: refused (ValueError): transformers' quantization configs (bitsandbytes,
        GPTQ, ...) are not llama_port's; see ``quantize``.
    quantize: "int8" replaces every nn.Linear (the decoder layers' projections and the head) by an
        Int8Linear (llama_port.quantization: weight-only int8, per-channel scales, bfloat16 inputs
        to the int8 kernel for a float32 model; the rest computes in ``dtype``), each
        decoder layer's as soon as its weights are in place, so peak memory stays under the float
        load's; on the CPU only (the int8 kernel's device), and not with device_map. A checkpoint
        saved from an int8 model (config.json's quantization_config, quant_method "llama_port") is
        loaded int8 whatever ``quantize`` says; another library's quantized checkpoint is refused.
    low_cpu_mem_usage: accepted and ignored: loading is always lean (weights are built on the meta
        device and filled one group at a time). trust_remote_code: accepted and ignored: no
        checkpoint code is ever run.
    tp_plan: "auto" loads tensor-parallel over every process of the default group (initialised
        from torchrun's environment when it is not: nccl on CUDA, gloo otherwise), each process
        reading only its slices; device_mesh: the 1-D DeviceMesh (or one with a "tp" dimension) to
        shard over instead (implies tp_plan="auto"). Weights go to the mesh's device (CUDA: the
        current device); ``device`` and ``device_map`` are refused with it. ValueError naming the
        head counts and the sizes that work when the mesh size does not split the model.

    Returns the model in eval mode, its ``name_or_path`` set to what was passed. Raises the errors
    of llama_port.checkpoints.errors.
    """
    if quantization_config is not None:
        raise ValueError(
            f"quantization_config={type(quantization_config).__name__}: llama_port does not quantize through "
            f"transformers' quantization configs; load with dtype= one of {sorted(DTYPES)}, or with "
            f"quantize= one of {list(QUANTIZE_METHODS)} (llama_port's weight-only int8)"
        )
    if quantize is not None:
        check_method(quantize)
        if tp_plan is not None or device_mesh is not None:
            raise ValueError(f"quantize={quantize!r} with tp_plan / device_mesh: int8 modules are not tensor-parallel; "
                             "load the int8 model in one process, or shard the float model")  # fmt: skip
        if device_map is not None:
            raise ValueError(f"quantize={quantize!r} with device_map={device_map!r}: an int8 model is loaded on one "
                             "device (device='cpu'); accelerate's dispatch would keep float weights")  # fmt: skip
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"quantize={quantize!r} on device={str(device)!r}: PyTorch's int8 weight kernel "
                             "(_weight_int8pack_mm) runs on the CPU; load with device='cpu'")  # fmt: skip
    requested_dtype = parse_dtype(dtype, torch_dtype)
    if device is not None and device_map is not None:
        raise ValueError(f"pass device= or device_map=, not both (got device={device!r}, device_map={device_map!r})")
    mesh = None
    if tp_plan is not None or device_mesh is not None:
        if device is not None or device_map is not None:
            raise ValueError(
                f"tp_plan={tp_plan!r} / device_mesh= place the weights on the mesh's devices; "
                f"pass neither device= nor device_map= with them (got device={device!r}, device_map={device_map!r})"
            )
        mesh = tensor_parallel_mesh(tp_plan, device_mesh)
        device = mesh_device(mesh)
    backend = get_backend(attn_implementation) if attn_implementation is not None else None  # bad names fail first

    if isinstance(name_or_path, CheckpointSource):
        source = name_or_path
    else:
        hub = HubOptions(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        source = open_checkpoint(_gguf_in_folder(name_or_path, gguf_file), hub)
    target_dtype = requested_dtype or source.dtype
    if target_dtype not in DTYPES.values():
        raise UnsupportedCheckpointError(
            f"{source.location}: the weights are {dtype_name(target_dtype)}, which llama_port does not compute in; "
            f"load them converted: dtype=torch.bfloat16 (or one of {sorted(DTYPES)})"
        )

    # A backend that checks the device it runs on (flash) is selected once the weights are on it:
    # on the meta device its check could only fail.
    build_attn = attn_implementation if backend is None or backend.check_available is None else None
    # The model's own copy, as transformers': a load writes fields (dtype, the attention backend, an
    # int8 head's tie_word_embeddings) that must not leak into the source's or the caller's config.
    model_config = copy.deepcopy(source.config if config is None else as_llama_config(config))
    if mesh is not None:
        check_tp_size(model_config, mesh.size())  # before anything is built or read
    model = build_meta_model(cls, model_config, target_dtype, build_attn)
    saved_int8 = _saved_quantization(model.config, source)
    if saved_int8 is not None:
        if device_map is not None or mesh is not None:
            raise ValueError(
                f"{source.location}: an int8 checkpoint is loaded on one device, not with device_map / tp_plan / device_mesh"
            )
        quantize_weights(model, "int8", skip=saved_int8, empty=True)  # int8 parameters for its int8 tensors
    placement = plan_placement(model, target_dtype, device, device_map, max_memory, offload_folder)
    if mesh is not None:
        parallelize(model, mesh)  # meta DTensors: each knows its rank's shape

    params = dict(model.named_parameters())  # the meta parameters, each shared one once
    aliases = tied_aliases(model)
    when_filled = _quantize_when_filled(model) if quantize is not None and saved_int8 is None else None
    loaded, unexpected, heads = _load_tensors(model, params, aliases, source, placement, progress, mesh, when_filled)
    _settle_tied_heads(model, params, aliases, heads, loaded, placement, source)
    _check_keys(model, params, source, loaded, unexpected, strict, placement)
    _materialize_buffers(model, placement)
    model.tie_weights()
    if when_filled is not None:
        quantize_weights(model, quantize)  # what was not complete in the loop: the (tied) head, missing weights
    leftover = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_meta and placement.device_for(name) != "disk"
    ]
    assert not leftover, f"still on the meta device after loading: {leftover}"

    if placement.device_map is not None:
        _dispatch(model, placement)
    if attn_implementation is not None and build_attn != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    elif attn_implementation is None:
        # Nothing asked for: now that device and dtype are known, flash_attention_2 when it can run.
        chosen = default_attn_implementation(model.device, target_dtype)
        if chosen != model.attn_implementation:
            model.set_attn_implementation(chosen)
    model.config.dtype = dtype_name(target_dtype)
    model.config.name_or_path = source.location if isinstance(name_or_path, CheckpointSource) else name_or_path
    generation_file = next((f for f in source.tokenizer_files if f.name == GENERATION_CONFIG_NAME), None)
    if generation_file is not None:  # else the one LlamaForCausalLM derived from the config
        model.generation_config = GenerationConfig.from_pretrained(generation_file, CorruptCheckpointError)
    return model.eval()


def _saved_quantization(config: Any, source: CheckpointSource) -> list[str] | None:
    """The modules_not_converted of an int8 checkpoint saved by llama_port (None for a float one);
    UnsupportedCheckpointError for another library's quantization_config (a ``config=`` passed in)."""
    value = getattr(config, "quantization_config", None)
    if not value:
        return None
    try:
        return read_quantization_config(value, source.location)
    except ValueError as err:
        raise UnsupportedCheckpointError(str(err)) from None


def _quantize_when_filled(model: nn.Module) -> Callable[[str], None]:
    """A callback for each placed parameter name: once every parameter of an nn.Linear that
    quantize_weights converts is in place, that linear is quantized, so the float weights of one
    decoder layer at most are held beside the int8 ones."""
    pending = set(convertible(model, ()))

    def placed(name: str) -> None:
        module_name = name.rpartition(".")[0]
        if module_name in pending and not any(p.is_meta for p in model.get_submodule(module_name).parameters()):
            quantize_linear(model, module_name)
            pending.discard(module_name)

    return placed


def _gguf_in_folder(name_or_path: str | os.PathLike, gguf_file: str | os.PathLike | None) -> str | os.PathLike:
    """``name_or_path``, or with ``gguf_file`` the file of that name in the local folder ``name_or_path``."""
    if gguf_file is None:
        return name_or_path
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"gguf_file={str(gguf_file)!r} names a file in a local folder, but {str(name_or_path)!r} is not one; "
            "pass the .gguf file's path as name_or_path instead (GGUF files on the Hub are not fetched)"
        )
    return folder / gguf_file

def build_meta_model(cls: type, config: Any, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    """``cls(config)`` with every parameter on the meta device (shapes and names, no storage, no
    initialisation); buffers, i.e. the rotary frequencies, are computed on the CPU."""
    with _ParametersOnMeta():
        model = cls(config, attn_implementation=attn_implementation)
    return model.to(dtype)


class _ParametersOnMeta(TorchFunctionMode):
    """Tensor factories called without a device (nn.Linear, nn.Embedding and RMSNorm making their
    parameters) make meta tensors; random initialisers on meta tensors do nothing.

    Not ``with torch.device("meta")``: that puts the rotary arithmetic on meta tensors too, and the
    first arithmetic (or ``normal_``) on a meta tensor imports torch._dynamo, 1.3 s and 70 MB,
    which was most of the cost of loading a 400 MB checkpoint. What transformers'
    init_empty_weights / no_init_weights do, without patching nn.Module for every thread.
    """

    FACTORIES = (torch.empty, torch.zeros, torch.ones)
    INITIALISERS = ("normal_", "uniform_")  # Tensor methods (_init_weights) and nn.init functions alike

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        elif getattr(func, "__name__", None) in self.INITIALISERS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


# -------------------------------------------------------------------------------------- placement
@dataclass
class Placement:
    """Where each weight goes: ``device``, or per module through an accelerate ``device_map``."""

    device: torch.device
    device_map: DeviceMap | None = None
    offload_folder: Path | None = None
    offload_index: dict[str, dict] = field(default_factory=dict)  # accelerate's, for the "disk" weights

    def device_for(self, name: str) -> torch.device | str:
        """The device for parameter/buffer ``name``, or "disk"."""
        if self.device_map is None:
            return self.device
        target = lookup_device(self.device_map, name)
        if target is None:
            return self.device
        return "disk" if target == "disk" else _as_device(target)


def lookup_device(device_map: DeviceMap, name: str) -> Any:
    """The entry of the longest module name in ``device_map`` that contains ``name`` ("" is the root)."""
    best = None
    for key, value in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best[0]):
                best = (key, value)
    return None if best is None else best[1]


def _as_device(value: str | int | torch.device) -> torch.device:
    return torch.device(f"cuda:{value}") if isinstance(value, int) else torch.device(value)


def plan_placement(
    model: nn.Module,
    dtype: torch.dtype,
    device: str | torch.device | None,
    device_map: str | int | torch.device | DeviceMap | None,
    max_memory: dict[str | int, int | str] | None,
    offload_folder: str | os.PathLike | None,
) -> Placement:
    """Turn device / device_map into a Placement; accelerate decides "auto" and friends."""
    single = device if device is not None else device_map
    if single is None or isinstance(single, (int, torch.device)) or (
        isinstance(single, str) and single not in ACCELERATE_DEVICE_MAPS
    ):
        target = _as_device(single if single is not None else "cpu")
        _check_device(target)
        return Placement(target)
    if isinstance(device_map, str):
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=NO_SPLIT_MODULES, dtype=dtype,
                low_zero=device_map == "balanced_low_0",
            )
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=NO_SPLIT_MODULES, dtype=dtype
        )
    if not isinstance(device_map, dict):
        raise ValueError(
            f"device_map={device_map!r}; expected a device, one of {list(ACCELERATE_DEVICE_MAPS)} "
            "or a {module: device} dict"
        )
    uncovered = [name for name, _ in model.named_parameters() if lookup_device(device_map, name) is None]
    if uncovered:
        raise ValueError(f"device_map does not place {format_keys(uncovered)}")
    for value in set(device_map.values()):
        if value != "disk":
            _check_device(_as_device(value))
    on_disk = [name for name, value in device_map.items() if value == "disk"]
    if on_disk and offload_folder is None:
        raise ValueError(f"device_map puts {on_disk} on 'disk'; pass offload_folder= (a folder for those weights)")
    if on_disk:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    devices = [_as_device(v) for v in device_map.values() if v not in ("cpu", "disk")]
    return Placement(
        devices[0] if devices else torch.device("cpu"),
        dict(device_map),
        Path(offload_folder) if offload_folder is not None else None,
    )


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available here; use 'cpu'")
    if device.type == "meta":
        raise ValueError("device 'meta': a loaded model needs real storage; build the model on meta directly instead")


# -------------------------------------------------------------------------------------- the loop
def _load_tensors(
    model: nn.Module,
    params: dict[str, Tensor],
    aliases: dict[str, str],
    source: CheckpointSource,
    placement: Placement,
    progress: bool | None,
    mesh: Any = None,
    placed: Callable[[str], None] | None = None,
) -> tuple[set[str], list[str], dict[str, Tensor]]:
    """Place every checkpoint tensor, calling ``placed(parameter name)`` after each. Returns the
    parameter names loaded, the unexpected checkpoint names, and the tensors found under a tied
    alias (a tied head saved anyway).

    mesh: a tensor-parallel load's; a source that can yield a rank's pieces (iter_rank_groups) does."""
    loaded: set[str] = set()
    unexpected: list[str] = []
    heads: dict[str, Tensor] = {}
    groups = source.iter_groups
    if mesh is not None and source.iter_rank_groups is not None:
        dims = {name: shard_dim(param) for name, param in params.items()}
        groups = lambda: source.iter_rank_groups(mesh.get_local_rank(), mesh.size(), dims.get)  # noqa: E731
    for name, target, tensor in iter_parameter_tensors(source, params, aliases, unexpected, "loading", progress, groups):
        if name in aliases:
            heads[name] = tensor  # settled once the embedding it is tied to is in place
            continue
        _place(model, target, params[target], tensor, placement, source.owns_tensors)
        loaded.add(target)
        if placed is not None:
            placed(target)
    return loaded, unexpected, heads


def iter_parameter_tensors(
    source: CheckpointSource,
    params: dict[str, Tensor],
    aliases: dict[str, str],
    unexpected: list[str],
    verb: str,
    progress: bool | None,
    groups: Callable[[], Iterator[dict[str, Tensor]]] | None = None,
) -> Iterator[tuple[str, str, Tensor]]:
    """Every checkpoint tensor that maps to one of ``params``, as (our name, the parameter it fills,
    tensor), checked before anything is placed: its shape against the parameter's
    (ShapeMismatchError), its dtype a floating one we load or exactly an integer parameter's (an
    int8 model's weights) (UnsupportedCheckpointError: an integer or bool weight is never cast
    silently, nor a float one into an int8 parameter), and no parameter filled twice under two spellings
    (CorruptCheckpointError naming both); each error names the file.

    Checkpoint names that map to no parameter are appended to ``unexpected``; names mapped to None
    (buffers recomputed from the config) are skipped. ``aliases`` maps a tied name (lm_head.weight)
    to the parameter it shares. Drives a progress bar over the source's groups: ``groups``, default
    ``source.iter_groups`` (a tensor-parallel load may pass ``source.iter_rank_groups``; a DTensor
    parameter takes its whole shape or its rank's local one)."""
    rename = _name_mapper(set(params) | set(aliases))
    spelled: dict[str, str] = {}  # our name -> the checkpoint name that filled it
    bar = progress_bar(source.num_groups, f"{verb} {source.root.name or source.root}", progress)
    try:
        for group in (groups or source.iter_groups)():
            for checkpoint_name, tensor in group.items():
                name = rename(checkpoint_name)
                if name is None:
                    continue
                target = aliases.get(name, name)
                if target not in params:
                    unexpected.append(checkpoint_name)
                    continue
                if name in spelled:
                    raise CorruptCheckpointError(
                        f"{source.file_of(checkpoint_name)}: tensors {spelled[name]!r} and {checkpoint_name!r} "
                        f"are both {name!r}; a checkpoint must hold each weight once"
                    )
                spelled[name] = checkpoint_name
                wanted = params[target].dtype
                if wanted.is_floating_point and tensor.dtype not in STORED_DTYPES:
                    raise UnsupportedCheckpointError(
                        f"{source.file_of(checkpoint_name)}: tensor {checkpoint_name!r} has dtype "
                        f"{dtype_name(tensor.dtype)}; weights must be floating: "
                        f"{sorted(dtype_name(d) for d in STORED_DTYPES)}"
                    )
                if not wanted.is_floating_point and tensor.dtype != wanted:
                    raise UnsupportedCheckpointError(
                        f"{source.file_of(checkpoint_name)}: tensor {checkpoint_name!r} has dtype "
                        f"{dtype_name(tensor.dtype)}; the quantized model stores it as {dtype_name(wanted)}"
                    )
                if tuple(tensor.shape) not in accepted_shapes(params[target]):
                    raise ShapeMismatchError(
                        f"{source.file_of(checkpoint_name)}: tensor {checkpoint_name!r} has shape "
                        f"{tuple(tensor.shape)}, but the config ({_config_summary(source.config)}) "
                        f"needs {tuple(params[target].shape)}"
                    )
                yield name, target, tensor
            del group
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _place(
    model: nn.Module,
    name: str,
    param: Tensor,
    tensor: Tensor,
    placement: Placement,
    owns: bool,
) -> None:
    """Put ``tensor`` in place of meta parameter ``name`` on its device, in ``param``'s dtype.

    ``owns``: the source lets ``tensor`` become the parameter itself (see CheckpointSource.owns_tensors)."""
    device = placement.device_for(name)
    if is_distributed(param):  # tensor parallel: this rank's piece only
        value = local_parameter(param, tensor, device)
        _set_parameter(model, name, nn.Parameter(value, requires_grad=param.requires_grad))
        return
    if device == "disk":
        from accelerate.utils import offload_weight

        value = tensor.to(device="cpu", dtype=param.dtype)
        offload_weight(value, name, str(placement.offload_folder), index=placement.offload_index)
        return
    if owns and tensor.device == device:
        value = tensor.to(param.dtype).contiguous()  # no copy when the dtype already matches
    else:
        value = torch.empty(param.shape, dtype=param.dtype, device=device)
        value.copy_(tensor)  # converts the dtype; reads a memory-mapped tensor page by page
    _set_parameter(model, name, nn.Parameter(value, requires_grad=param.requires_grad))


def _set_parameter(model: nn.Module, name: str, value: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = value


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{second name: first name} for parameters shared under two names (lm_head.weight when tied)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _name_mapper(expected: set[str]) -> Callable[[str], str | None]:
    """Checkpoint name -> model name, across the bare model / causal LM prefix; None: ignore it."""
    bare = not any(name.startswith("model.") for name in expected)

    def rename(name: str) -> str | None:
        if _IGNORED_KEYS.search(name):
            return None
        if bare:
            if name.startswith("lm_head."):
                return None  # a causal LM's head, which the bare model does not have
            return name.removeprefix("model.")
        if not name.startswith(("model.", "lm_head.")) and f"model.{name}" in expected:
            return f"model.{name}"  # a bare model's checkpoint loaded into the causal LM
        return name

    return rename


def _config_summary(config: Any) -> str:
    return (
        f"vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
        f"intermediate_size={config.intermediate_size}, heads={config.num_attention_heads}, "
        f"kv_heads={config.num_key_value_heads}, head_dim={config.head_dim}"
    )


# ------------------------------------------------------------------------------------------ after
def settle_tied_head(alias: str, target: str, head: Tensor, embedding: Tensor | None, config: Any, where: Path) -> str | None:
    """Where a head found in the checkpoint under a tied ``alias`` goes, as transformers settles it.

    embedding: the tensor ``alias`` is tied to (``target``), None when the checkpoint lacks it.
    Returns ``target`` (no embedding: the head is the shared tensor), None (equal to the embedding:
    it stays tied) or ``alias`` (different: the two are untied, with a warning, and
    ``config.tie_word_embeddings`` set False). Loading and converting both decide here.
    """
    if embedding is None:
        return target
    if embedding.is_meta or torch.equal(embedding, head.to(device=embedding.device, dtype=embedding.dtype)):
        return None
    warnings.warn(
        f"{where}: tie_word_embeddings is set but {alias} differs from {target}; loading both untied, "
        "as transformers does",
        stacklevel=5,
    )
    config.tie_word_embeddings = False
    return alias


def _settle_tied_heads(
    model: nn.Module,
    params: dict[str, Tensor],
    aliases: dict[str, str],
    heads: dict[str, Tensor],
    loaded: set[str],
    placement: Placement,
    source: CheckpointSource,
) -> None:
    """Place each head found under a tied alias where settle_tied_head says."""
    for alias, tensor in heads.items():
        target = aliases[alias]
        embedding = model.get_parameter(target) if target in loaded else None
        name = settle_tied_head(alias, target, tensor, embedding, model.config, source.file_of(alias))
        if name is not None:
            _place(model, name, params[target], tensor, placement, source.owns_tensors)
            loaded.add(target)


def _check_keys(
    model: nn.Module,
    params: dict[str, Tensor],
    source: CheckpointSource,
    loaded: set[str],
    unexpected: list[str],
    strict: bool,
    placement: Placement,
) -> None:
    """Raise (strict) or warn about missing / unexpected tensors; tie a missing head; init the rest."""
    missing = resolve_missing(set(params), loaded, unexpected, source, model.config, strict, params)
    for name in missing:
        _init_missing(model, name, params[name], placement)


def resolve_missing(
    expected: set[str],
    loaded: set[str],
    unexpected: list[str],
    source: CheckpointSource,
    config: Any,
    strict: bool,
    shapes: dict[str, Tensor],
) -> list[str]:
    """The missing tensor names left to initialise. strict: raise MissingKeysError, then
    UnexpectedKeysError; otherwise warn about both, and tie a missing head to the embedding (a
    checkpoint without one is most likely a tied one). Tying is otherwise the config's call
    (tie_word_embeddings): with strict, an untied config without lm_head is a missing key."""
    missing = sorted(expected - loaded)
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    untied_head_missing = head in missing and embedding in loaded and shapes[head].shape == shapes[embedding].shape
    if untied_head_missing and not strict:
        warnings.warn(f"{source.root}: no {head}; tying the output head to the input embeddings", stacklevel=5)
        config.tie_word_embeddings = True
        missing.remove(head)
    if strict and missing:
        also = f"; it also holds {len(unexpected)} unexpected: {format_keys(unexpected, 5)}" if unexpected else ""
        if untied_head_missing:
            also += "; with tie_word_embeddings=false the head is a weight of its own (set it true to tie it)"
        raise MissingKeysError(
            f"{source.root}: the checkpoint lacks {len(missing)} tensors the model needs: {format_keys(missing)}{also}",
            missing,
        )
    if strict and unexpected:
        raise UnexpectedKeysError(
            f"{source.file_of(unexpected[0])}: {len(unexpected)} tensors the model has no place for: "
            f"{format_keys(unexpected)}; strict=False loads the rest",
            unexpected,
        )
    if unexpected:
        warnings.warn(
            f"{source.root}: ignored {len(unexpected)} unexpected tensors: {format_keys(unexpected)}", stacklevel=5
        )
    if missing:
        warnings.warn(
            f"{source.root}: {len(missing)} tensors missing from the checkpoint, freshly initialised: "
            f"{format_keys(missing)}",
            stacklevel=5,
        )
    return missing


def _init_missing(model: nn.Module, name: str, param: Tensor, placement: Placement) -> None:
    """A missing tensor initialised as the model's own _init_weights would: ones for norms, zero
    biases, normal(0, initializer_range) otherwise (the padding row of an embedding zeroed)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not param.is_floating_point():
        raise MissingKeysError(f"{name}: an int8 weight missing from a quantized checkpoint cannot be initialised", [name])
    value = torch.empty(param.shape, dtype=param.dtype)
    if "norm" in type(module).__name__.lower():
        value.fill_(1.0)
    elif attr == "bias":
        value.zero_()
    else:
        value.normal_(mean=0.0, std=model.config.initializer_range)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            value[module.padding_idx].zero_()
    _place(model, name, param, value, placement, owns=True)


def _materialize_buffers(model: nn.Module, placement: Placement) -> None:
    """Recompute the rotary frequencies, which are never in a checkpoint (non-persistent buffers)."""
    for name, module in model.named_modules():
        if isinstance(module, LlamaRotaryEmbedding):
            device = placement.device_for(f"{name}.inv_freq" if name else "inv_freq")
            module.inv_freq = torch.empty(0, device="cpu" if device == "disk" else device)
            module.reset_parameters()  # computes on inv_freq's device


def _dispatch(model: nn.Module, placement: Placement) -> None:
    from accelerate import dispatch_model
    from accelerate.utils import save_offload_index

    folder = placement.offload_folder
    if folder is not None and placement.offload_index:
        save_offload_index(placement.offload_index, str(folder))
    dispatch_model(model, device_map=placement.device_map, offload_dir=str(folder) if folder is not None else None)
    model.hf_device_map = placement.device_map


def progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A tqdm bar, or None: ``progress`` None shows one for several groups on a terminal only."""
    show = progress if progress is not None else (total > 1 and sys.stderr.isatty())
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="group", leave=False)
