"""The Hub format in a local folder: config.json + safetensors or pytorch_model.bin, single or sharded.

Which weights: the first of model.safetensors, model.safetensors.index.json, pytorch_model.bin,
pytorch_model.bin.index.json that exists (transformers' order). A sharded checkpoint's files are
the ones its index's ``weight_map`` names (never a glob), each checked to lie inside the folder.

safetensors tensors are views of one private (copy-on-write) memory map per file, mapped once per
load, so the address space grows by the checkpoint's size and no more; the pages of each group
(a decoder layer) are released once the loader has consumed it, so touched pages never pile up,
and a group it keeps costs no copy. Every header is parsed and checked here first (dtype, shape,
offsets, file length, names unique across shards, layer count against config.json), so a
truncated or inconsistent shard fails before any weight is placed. ``.bin`` files go
through ``torch.load(weights_only=True, mmap=True)``: a pickle that would run code is refused, not run.
"""

from __future__ import annotations

import json
import math
import mmap
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor

from ..configuration import CONFIG_NAME, LlamaConfig, read_json_file, short_repr
from ..quantization import read_quantization_config
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    first_line,
    refused_as_corrupt,
)
from .names import layer_index
from .source import CheckpointSource

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# transformers' order of preference when a folder holds several.
WEIGHTS_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",  # transformers 5 saves the chat template beside tokenizer_config.json
    "generation_config.json",
)
SUPPORTED_MODEL_TYPES = ("llama",)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_LAYER_PREFIX = re.compile(r"(.*?layers\.\d+)\.")


def find_weights_file(folder: Path) -> Path | None:
    """The weights file (or index) transformers would read in ``folder``; None when there is none."""
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def read_hub_config(path: Path) -> LlamaConfig:
    """config.json -> LlamaConfig; errors name the file.

    CheckpointNotFoundError without the file; CorruptCheckpointError for one read_json_file refuses
    (over MAX_CONFIG_BYTES, bad JSON, too deeply nested) or a value LlamaConfig refuses;
    UnsupportedCheckpointError for another model_type or a quantized checkpoint other than
    llama_port's own int8 (quantization.read_quantization_config).
    """
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file")
    raw = read_json_file(path, CorruptCheckpointError)
    model_type = raw.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedCheckpointError(
            f"{path}: model_type is {short_repr(model_type)}; "
            f"llama_port loads {list(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    quant = raw.get("quantization_config")
    if quant:
        try:  # llama_port's own int8 format loads (quantized); another library's is refused
            read_quantization_config(quant, path)
        except ValueError as err:
            raise UnsupportedCheckpointError(str(err)) from None
    with refused_as_corrupt(path):
        return LlamaConfig.from_dict(raw)


def read_hub_checkpoint(folder: str | Path, weights_file: str | Path | None = None) -> CheckpointSource:
    """Describe the Hub-format checkpoint in ``folder``.

    ``weights_file``: a specific model.safetensors / .bin / index to read instead of the preferred
    one. iter_groups() yields one dict per decoder layer (and per other tensor) for safetensors,
    one per file for .bin. Raises CheckpointNotFoundError (no config.json, no weights, a shard the
    index names is absent), CorruptCheckpointError, UnsafeCheckpointError (an index pointing outside
    the folder), UnsupportedCheckpointError (another model_type, a quantized checkpoint).
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointNotFoundError(f"{folder}: no {CONFIG_NAME} in this folder")
    config = read_hub_config(config_path)
    weights = Path(weights_file) if weights_file is not None else find_weights_file(folder)
    if weights is None:
        raise CheckpointNotFoundError(
            f"{folder}: {CONFIG_NAME} but no weights; expected one of {list(WEIGHTS_FILES)}"
        )
    if not weights.is_file():
        raise CheckpointNotFoundError(f"{weights}: no such file")

    if weights.name.endswith(".index.json"):
        weight_map = read_index(weights)
        files = [_shard_path(folder, shard, weights) for shard in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointNotFoundError(
                f"{weights}: names shard {missing[0].name!r}, which is not in {folder}"
                + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        is_safetensors = weights.name.startswith("model.safetensors")
    else:
        weight_map = None
        files = [weights]
        is_safetensors = weights.suffix == ".safetensors"

    tokenizer_files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if is_safetensors:
        return _safetensors_source(folder, config, files, weight_map, tokenizer_files)
    return _bin_source(folder, config, files, weight_map, tokenizer_files)


def read_index(path: Path) -> dict[str, str]:
    """An index's weight_map {tensor name: shard file name}, each name checked to stay inside the folder."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{path}: no 'weight_map' object mapping tensor names to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CorruptCheckpointError(f"{path}: weight_map[{name!r}] is {shard!r}; expected a file name")
        check_relative(shard, path)
    return weight_map


def check_relative(name: str, index_path: Path) -> None:
    """Refuse a shard name that could reach outside the checkpoint folder (absolute, '..', a drive).

    Checked on the name itself, not on the resolved path: in the Hub cache every file is a symlink
    into ../../blobs, so resolving would put even honest shards outside the snapshot folder.
    """
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if not name or posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise UnsafeCheckpointError(
            f"{index_path}: weight_map names {name!r}, a path outside the checkpoint folder "
            f"{index_path.parent}; shards must be files inside it"
        )


def _shard_path(folder: Path, name: str, index_path: Path) -> Path:
    check_relative(name, index_path)
    return folder / name


# ------------------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors file: where its bytes are and what they hold."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Parse and check a safetensors header; the entries in file order.

    Checks what the safetensors library checks, so a file it would refuse is refused here, before
    any data is read: the header length, JSON, known dtypes, each tensor's byte span matching its
    dtype and shape, spans tiling the data section exactly, and the file holding all of it.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(
                f"{path}: file is truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"
            )
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CorruptCheckpointError(
                f"{path}: header length {header_len} does not fit the file's {size} bytes "
                "(truncated, or not safetensors)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)

    data_start = 8 + header_len
    data_len = size - data_start
    entries = []
    for name, info in header.items():
        entries.append(_parse_entry(path, name, info, data_start))
    entries.sort(key=lambda e: e.start)
    position = data_start
    for entry in entries:
        if entry.start != position:
            raise CorruptCheckpointError(f"{path}: tensor {entry.name!r} does not start where the previous one ends")
        position += entry.nbytes
    if position - data_start != data_len:
        problem = "file is truncated" if position - data_start > data_len else "file has trailing bytes"
        raise CorruptCheckpointError(
            f"{path}: {problem}: the header describes {position - data_start} bytes of tensor data, "
            f"the file holds {data_len}"
        )
    return entries


def _parse_entry(path: Path, name: str, info: Any, data_start: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CorruptCheckpointError(f"{path}: header entry {name!r} lacks dtype / shape / data_offsets")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype_name not in SAFETENSORS_DTYPES:
        raise UnsupportedCheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype_name!r}; readable: {sorted(SAFETENSORS_DTYPES)}"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes; {dtype_name} {shape} needs {nbytes}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes)


def map_file(path: Path, file_size: int) -> mmap.mmap:
    """A private (copy-on-write) read map of the whole file: tensors made from it are writable,
    and writing one never reaches the file. CorruptCheckpointError if the file changed size."""
    if path.stat().st_size != file_size:
        raise CorruptCheckpointError(f"{path}: the file changed size while it was being loaded")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def map_tensors(mapped: mmap.mmap, entries: list[TensorEntry]) -> dict[str, Tensor]:
    """``entries`` as tensors viewing ``mapped`` (nothing is read until a tensor is used); each
    has a storage of its own size and keeps the map alive."""
    tensors = {}
    for entry in entries:
        if entry.nbytes == 0:
            tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=entry.dtype, count=entry.nbytes // entry.dtype.itemsize, offset=entry.start)
        tensors[entry.name] = flat.view(entry.shape)
    return tensors


def release_pages(mapped: mmap.mmap, entries: list[TensorEntry]) -> None:
    """Drop the resident pages of ``entries``' bytes from the private map (MADV_DONTNEED). The
    pages are clean (nothing wrote them), so a tensor still viewing them reads them back from
    the file on its next use; the loader's RSS stays at what it keeps."""
    if not hasattr(mapped, "madvise") or not entries:
        return
    start = min(e.start for e in entries) // mmap.PAGESIZE * mmap.PAGESIZE
    end = max(e.start + e.nbytes for e in entries)
    if end > start:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def _group_key(name: str) -> str:
    """Tensors of one decoder layer form one group; every other tensor is a group of its own."""
    match = _LAYER_PREFIX.match(name)
    return match.group(1) if match else name


def _safetensors_source(
    folder: Path,
    config: LlamaConfig,
    files: list[Path],
    weight_map: dict[str, str] | None,
    tokenizer_files: list[Path],
) -> CheckpointSource:
    plan: list[tuple[Path, int, list[TensorEntry]]] = []
    tensor_files: dict[str, Path] = {}
    for path in files:
        entries = read_safetensors_header(path)
        groups: dict[str, list[TensorEntry]] = {}
        for entry in entries:
            if entry.name in tensor_files:
                raise CorruptCheckpointError(
                    f"{path}: tensor {entry.name!r} is also in {tensor_files[entry.name]}; each tensor must be in one shard"
                )
            groups.setdefault(_group_key(entry.name), []).append(entry)
            tensor_files[entry.name] = path
        size = path.stat().st_size
        plan.extend((path, size, group) for group in groups.values())
    if weight_map is not None:
        for name, shard in weight_map.items():
            if tensor_files.get(name) != folder / shard:
                raise CorruptCheckpointError(
                    f"{folder / shard}: the index puts tensor {name!r} here, but the file lacks it"
                )
    check_layer_count(config, tensor_files, folder)

    def iter_groups() -> Iterator[dict[str, Tensor]]:
        maps: dict[Path, mmap.mmap] = {}  # one map per file for this iteration
        for path, size, group in plan:
            if path not in maps:
                maps.clear()  # the previous file's map lives on only through tensors kept from it
                maps[path] = map_file(path, size)
            yield map_tensors(maps[path], group)
            release_pages(maps[path], group)  # the loader has placed this group

    return CheckpointSource(
        format="safetensors",
        root=folder,
        config=config,
        iter_groups=iter_groups,
        num_groups=len(plan),
        dtype=_config_dtype(config) or _first_float_dtype(e.dtype for _, _, group in plan for e in group),
        files=[folder / CONFIG_NAME, *files],
        tokenizer_files=tokenizer_files,
        tensor_files=tensor_files,
        owns_tensors=True,
    )


# -------------------------------------------------------------------------------------------- .bin
def load_bin(path: Path) -> dict[str, Tensor]:
    """torch.load a pytorch_model*.bin safely: weights_only (no code runs), memory-mapped when possible."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files from torch.save(_use_new_zipfile_serialization=False) cannot be mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(
                f"{path}: refused: the pickle would call code on load ({first_line(err)}); "
                "only tensors and plain containers are accepted (convert it to safetensors from a trusted copy)"
            ) from err
        raise CorruptCheckpointError(f"{path}: not a readable PyTorch file ({first_line(err)})") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: not a readable PyTorch file ({first_line(err)})") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, not a {{name: tensor}} state dict")
    return state


def _bin_source(
    folder: Path,
    config: LlamaConfig,
    files: list[Path],
    weight_map: dict[str, str] | None,
    tokenizer_files: list[Path],
) -> CheckpointSource:
    tensor_files = {name: folder / shard for name, shard in (weight_map or {}).items()}
    dtype = _config_dtype(config)
    if dtype is None or weight_map is None:
        # The first file is only mapped here, not read: its dtype and names cost one header.
        first = load_bin(files[0])
        dtype = dtype or _first_float_dtype(t.dtype for t in first.values())
        if weight_map is None:
            tensor_files = dict.fromkeys(first, files[0])
        del first
    check_layer_count(config, tensor_files, folder)

    def iter_groups() -> Iterator[dict[str, Tensor]]:
        for path in files:
            state = load_bin(path)
            tensor_files.update(dict.fromkeys(state, path))  # what the file really holds, for messages
            yield state

    return CheckpointSource(
        format="bin",
        root=folder,
        config=config,
        iter_groups=iter_groups,
        num_groups=len(files),
        dtype=dtype,
        files=[folder / CONFIG_NAME, *files],
        tokenizer_files=tokenizer_files,
        tensor_files=tensor_files,
        owns_tensors=False,
    )


def check_layer_count(config: LlamaConfig, tensor_names: Iterable[str], where: Path) -> None:
    """CorruptCheckpointError when config.json's num_hidden_layers is not the number of decoder
    layers the weights hold: checked before a model is built, so a config claiming 100000 layers
    over a 3-layer checkpoint costs nothing."""
    layers = {index for name in tensor_names if (index := layer_index(name)) is not None}
    if layers and config.num_hidden_layers != max(layers) + 1:
        raise CorruptCheckpointError(
            f"{where / CONFIG_NAME}: num_hidden_layers={config.num_hidden_layers}, but the weights hold "
            f"decoder layers 0..{max(layers)} ({max(layers) + 1} layers)"
        )


# ------------------------------------------------------------------------------------------ dtypes
def _config_dtype(config: LlamaConfig) -> torch.dtype | None:
    """config.json's dtype (transformers' dtype="auto" reads it first), if it names one."""
    if config.dtype in (None, "auto"):
        return None
    return getattr(torch, config.dtype)


def _first_float_dtype(dtypes: Iterator[torch.dtype]) -> torch.dtype:
    for dtype in dtypes:
        if dtype.is_floating_point:
            return dtype
    return torch.float32
