"""Model or checkpoint -> a Hub-format folder that transformers' from_pretrained reads.

``save_pretrained``: config.json + model.safetensors, or model-0000i-of-0000N.safetensors with
model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"}) past max_shard_size,
split by huggingface_hub's split_torch_state_dict_into_shards; pytorch_model*.bin alike with
``safe_serialization=False``. A tied lm_head is not written (transformers re-ties it on load).

``convert_checkpoint``: any readable checkpoint to that layout without building a model: the
source's groups stream into shards of at most max_shard_size, so memory holds one shard.

Both write the whole new checkpoint into a temporary folder beside the destination and swap it in
(``atomic.replace_folder``), so a failure or a kill at any point leaves the old checkpoint or the new
one there, never a mix. ``save_pretrained`` replaces the model's files (config.json, the weights and
index of either format) as a set and keeps the folder's other files (a tokenizer, a README), as
transformers does; ``convert_checkpoint`` refuses a non-empty destination unless ``overwrite=True``,
then replaces all of it, and never writes or deletes a source file, symlinks resolved. Neither
writes a floating dtype the loader refuses (``dtypes.DTYPES``): a float8 source converts with
``dtype="bfloat16"``.

``push_to_hub``: save_pretrained into a temporary folder, then huggingface_hub's upload_folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..configuration import CONFIG_NAME
from ..distributed.tensor_parallel import is_distributed
from ..dtypes import DTYPES, dtype_name, parse_dtype
from ..modeling import LlamaForCausalLM
from .atomic import replace_folder
from .errors import first_line
from .hub import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from .loading import (
    build_meta_model,
    iter_parameter_tensors,
    resolve_missing,
    settle_tied_head,
    tied_aliases,
)
from .resolve import HubOptions, is_connection_error, open_checkpoint
from .source import CheckpointSource

SAFETENSORS_METADATA = {"format": "pt"}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _weights_files(weights_name: str, index_name: str) -> str:
    stem, suffix = weights_name.split(".", 1)
    return rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{re.escape(suffix)}|{re.escape(index_name)}"


# What a save replaces as a set: config.json and the weights, single or sharded, in either format.
_MODEL_FILES = re.compile("|".join([
    re.escape(CONFIG_NAME),
    _weights_files(SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME),
    _weights_files(WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
]))


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (KB = 1000 bytes, KiB = 1024, as huggingface_hub)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size={size!r}; expected a positive int (bytes) or a string like '5GB', '500MB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


# ----------------------------------------------------------------------------------- save_pretrained
def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` to ``save_directory`` as transformers would (see the module docstring).

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (transformers' argument:
    e.g. the full state dict gathered from a sharded model on rank 0); the config, the generation
    config and the tied-head names still come from ``model``. ValueError when the weights are
    DTensors (FSDP2 / tensor-parallel shards): gather them first
    (``llama_port.distributed.save_full_checkpoint``, which ``model.save_pretrained`` runs)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    directory = Path(save_directory)
    state = model.state_dict() if state_dict is None else dict(state_dict)
    if holds_dtensors(state.values()):
        raise ValueError(
            f"cannot save to {directory}: the weights are DTensors (sharded by FSDP2 or tensor parallelism), and "
            "writing them would write one rank's shards; call model.save_pretrained(folder) on every rank, or "
            "llama_port.distributed.save_full_checkpoint(model, folder), or pass state_dict= a full state dict"
        )
    offloaded = [name for name, t in state.items() if t.is_meta]
    if offloaded:
        raise ValueError(
            f"cannot save: {len(offloaded)} weights are offloaded (device_map) and not in memory, "
            f"e.g. {offloaded[0]!r}; load without disk offload to save"
        )
    for alias in tied_aliases(model):
        state.pop(alias, None)  # as transformers: the tied head is not written, the loader re-ties it
    for name, tensor in state.items():
        _check_loadable(name, tensor.dtype, directory, "cast the model first, e.g. model.to(torch.bfloat16)")

    if safe_serialization:
        weights_name, index_name = SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME
    else:
        weights_name, index_name = WEIGHTS_NAME, WEIGHTS_INDEX_NAME
    stem, suffix = weights_name.split(".", 1)
    # Split by the tensors' own sizes: the splitter measures storages, and loaded weights are views
    # sharing one memory-mapped storage per group, which would count a whole file per tensor.
    split = split_torch_state_dict_into_shards(
        {name: torch.empty_like(t, device="meta") for name, t in state.items()},
        filename_pattern=f"{stem}{{suffix}}.{suffix}",
        max_shard_size=parse_size(max_shard_size),
    )
    config = model.config.copy()
    floating = [t.dtype for t in state.values() if t.is_floating_point()]  # an int8 model's weights are not
    config.dtype = dtype_name(floating[0]) if floating else config.dtype
    with replace_folder(directory, overwrite=True, keep=lambda name: not _MODEL_FILES.fullmatch(name)) as staging:
        for filename, names in split.filename_to_tensors.items():
            shard = {name: state[name].detach().to("cpu").contiguous() for name in names}
            if not safe_serialization:  # torch.save writes whole storages: a view would drag its file along
                shard = {name: _standalone(tensor) for name, tensor in shard.items()}
            _write_shard(shard, staging / filename, safe_serialization)
            del shard
        if split.is_sharded:
            index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
            _write_index(index, staging / index_name)
        config.save_pretrained(staging)
        if hasattr(model, "generation_config"):  # a model that generates, as transformers writes it
            model.generation_config.save_pretrained(staging)
    return directory


def holds_dtensors(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a torch.distributed DTensor (none can exist, and nothing is
    imported, while torch.distributed.tensor was never imported)."""
    return any(is_distributed(t) for t in tensors)


def push_to_hub(
    model: nn.Module, repo_id: str, *, commit_message: str = "Upload model", private: bool | None = None,
    token: str | None = None, revision: str | None = None, create_pr: bool = False,
    max_shard_size: int | str = "5GB", safe_serialization: bool = True,
) -> str:
    """Upload ``model`` as save_pretrained writes it to the Hub repo ``repo_id`` (created if it does
    not exist); returns the commit's URL. ConnectionError, one line naming the repo, when the Hub
    cannot be reached; the Hub's own errors (auth, permissions) pass through."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="llama_port_push_") as folder:
        save_pretrained(model, folder, max_shard_size=max_shard_size, safe_serialization=safe_serialization)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                create_pr=create_pr,
            )
        except Exception as err:  # only the network's errors are translated
            if not is_connection_error(err):
                raise
            raise ConnectionError(
                f"push_to_hub({repo_id!r}): the Hub is unreachable, nothing was uploaded ({first_line(err)})"
            ) from err
    return str(commit)


def _check_loadable(name: str, dtype: torch.dtype, where: Path, fix: str) -> None:
    """ValueError unless a tensor written as ``dtype`` is one the loader reads back: never write a
    checkpoint llama_port refuses (a floating dtype outside dtypes.DTYPES, e.g. float8)."""
    if dtype.is_floating_point and dtype not in DTYPES.values():
        raise ValueError(
            f"{where}: tensor {name!r} would be written as {dtype_name(dtype)}, which llama_port does not "
            f"load (floating dtypes: {sorted(DTYPES)}); {fix}"
        )


def _write_shard(shard: dict[str, Tensor], path: Path, safe_serialization: bool) -> None:
    """One weights file, always a new one in the temporary folder: a model loaded from the old
    folder keeps its weights memory-mapped, and rewriting a file in place would pull them from under
    it (SIGBUS)."""
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(shard, str(path), metadata=SAFETENSORS_METADATA)
    else:
        torch.save(shard, path)


def _write_index(index: dict, path: Path) -> None:
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------- convert
def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    max_shard_size: int | str = "5GB",
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    hub: HubOptions = HubOptions(),
) -> Path:
    """Write any checkpoint llama_port reads (Hub folder or repo id, Meta folder, GGUF) to ``dst`` in Hub format.

    ``dst`` gets config.json, model.safetensors or shards + index (``dtype``: "auto" keeps the
    source's), and the tokenizer: the source's tokenizer files copied, or for GGUF one built by
    transformers (when installed) from the file's metadata. Tensors are checked against the config
    as a load checks them (shapes, missing, unexpected). ``hub``: for a Hub repo id. Returns ``dst``.

    ValueError, with ``dst`` untouched: ``dst`` is a file, a mount point, not writable, the source's
    folder or holds a source file (symlinks resolved), or is not empty and ``overwrite`` is False;
    or the source's dtype is one the loader refuses (float8: pass ``dtype="bfloat16"``).
    ``overwrite`` replaces all of a non-empty ``dst``: nothing of the old checkpoint (shards,
    tokenizer, chat template) stays.
    """
    out_dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    source = open_checkpoint(src, hub)
    out_dtype = out_dtype or source.dtype
    dst = Path(dst)
    _refuse_writing_the_source(source, dst)
    if overwrite:
        _refuse_overwriting_other_files(dst)

    meta_model = build_meta_model(LlamaForCausalLM, source.config, out_dtype, None)
    params = dict(meta_model.named_parameters())
    aliases = tied_aliases(meta_model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    heads: dict[str, Tensor] = {}  # a tied head found in the checkpoint, settled at the end
    tied_targets: dict[str, Tensor] = {}  # the tensors such a head is compared with
    fix = "dtype='auto' keeps the source's; pass dtype='bfloat16' (llama-port convert --dtype bfloat16)"
    with replace_folder(dst, overwrite=overwrite) as staging:
        writer = _ShardWriter(staging, max_bytes)
        for name, _, tensor in iter_parameter_tensors(source, params, aliases, unexpected, "converting", progress):
            tensor = _standalone(tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
            _check_loadable(name, tensor.dtype, source.file_of(name), fix)
            if name in aliases:
                heads[name] = tensor
                continue
            if name in aliases.values():
                tied_targets[name] = tensor
            writer.add(name, tensor)
            loaded.add(name)
        for alias, tensor in heads.items():  # settled as loading settles them
            target = aliases[alias]
            embedding = tied_targets.get(target) if target in loaded else None
            name = settle_tied_head(alias, target, tensor, embedding, meta_model.config, source.file_of(alias))
            if name is not None:
                writer.add(name, tensor)
                loaded.add(target)
        resolve_missing(set(params), loaded, unexpected, source, meta_model.config, strict=True, shapes=params)
        writer.finish()
        config = meta_model.config.copy()
        config.dtype = dtype_name(out_dtype)
        config.save_pretrained(staging)
        _write_tokenizer(source, staging)
    return dst


# What a checkpoint folder holds (Hub, Meta, GGUF, tokenizer, model card): all that --overwrite may replace.
_CHECKPOINT_ENTRIES = re.compile(
    r"(config|generation_config|params|special_tokens_map|added_tokens|vocab|chat_template)\.json|"
    r".*\.(safetensors|bin|pth|gguf|index\.json)|tokenizer.*|merges\.txt|chat_template\.jinja|"
    r"README\.md|LICENSE.*|USE_POLICY\.md|\.gitattributes|original"
)


def _refuse_overwriting_other_files(dst: Path) -> None:
    """ValueError when ``dst`` holds entries no checkpoint has (``convert SRC ~ --overwrite``
    must not empty a home folder): --overwrite replaces a checkpoint, not a folder of other things."""
    if not dst.is_dir():
        return
    others = sorted(entry.name for entry in dst.iterdir() if not _CHECKPOINT_ENTRIES.fullmatch(entry.name))
    if others:
        shown = ", ".join(others[:5]) + (f", ... ({len(others) - 5} more)" if len(others) > 5 else "")
        raise ValueError(
            f"{dst}: --overwrite replaces a checkpoint folder, and this one also holds {shown}; "
            "convert into an empty or checkpoint-only folder"
        )


def _refuse_writing_the_source(source: CheckpointSource, dst: Path) -> None:
    """ValueError when ``dst`` is the source's folder or holds one of its files once symlinks are
    resolved: replacing ``dst`` would delete the source."""
    target = dst.resolve()
    if target == source.root.resolve():
        raise ValueError(f"{dst}: is where the source checkpoint lives; convert to another folder")
    for path in [*source.files, *source.tokenizer_files]:
        if path.resolve().is_relative_to(target):
            raise ValueError(
                f"{dst}: holds the source file {path} (resolved: {path.resolve()}); replacing {dst} would "
                "delete it: convert to another folder"
            )


def _standalone(tensor: Tensor) -> Tensor:
    """``tensor`` with a storage of its own (safetensors refuses tensors sharing memory)."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


class _ShardWriter:
    """Packs tensors into safetensors shards of at most ``max_bytes`` (a bigger tensor gets its own),
    as split_torch_state_dict_into_shards does, writing each shard into ``directory`` as it fills;
    final names once the count is known."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.current: dict[str, Tensor] = {}
        self.current_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor
        self.current_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        path = self.directory / f".partial-{len(self.written):05d}.safetensors"
        _write_shard(self.current, path, safe_serialization=True)
        self.written.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        if self.current or not self.written:
            self._flush()
        count = len(self.written)
        names = (
            [SAFE_WEIGHTS_NAME] if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for (partial, tensors), name in zip(self.written, names):
            partial.rename(self.directory / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            _write_index(index, self.directory / SAFE_WEIGHTS_INDEX_NAME)


def _write_tokenizer(source: CheckpointSource, dst: Path) -> None:
    """The source's tokenizer files (not its config.json) into ``dst``; for GGUF, one built by transformers."""
    for path in source.tokenizer_files:
        if path.name != CONFIG_NAME:
            shutil.copyfile(path, dst / path.name)
    if source.format == "gguf":
        try:
            from transformers import AutoTokenizer
        except ImportError:
            warnings.warn(
                f"{dst}: no tokenizer written: building one from a GGUF file needs transformers", stacklevel=3
            )
            return
        gguf_file = source.files[0]
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tokenizer.save_pretrained(str(dst))
