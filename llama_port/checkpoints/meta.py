"""Meta's original LLaMA format: ``params.json`` + ``consolidated.NN.pth``, one file per model-parallel rank.

Found as Meta distributes it (a folder with params.json) or as Meta's Hub repos ship it, inside
``original/``; either the folder or its parent is accepted. Reading turns Meta's names and layouts
into transformers' (see names.py): shards are concatenated along each tensor's split dimension, and
wq/wk rows reordered from Meta's interleaved rotary layout to transformers' half-split one.

params.json has no context length, token ids or FFN size; they are derived as documented in
``meta_ffn_hidden_dim``, ``meta_context_length`` and ``_special_token_ids``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..configuration import (
    BOOL,
    CONFIG_FIELDS,
    ROPE_FIELDS,
    FieldSpec,
    LlamaConfig,
    integer,
    number,
    read_json_file,
    token_id_fields,
)
from .errors import CheckpointNotFoundError, CorruptCheckpointError, ShapeMismatchError, refused_as_corrupt
from .names import HF_FROM_META, META_IGNORED, META_SHARD_DIM, interleaved_to_half_split, map_name, template_of
from .source import CheckpointSource

PARAMS_NAME = "params.json"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth\Z")
ORIGINAL_SUBFOLDER = "original"

# Llama 3.1's rope scaling, as Meta's reference apply_scaling() hard-codes it.
LLAMA3_ROPE_DEFAULTS = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_ROPE_THETA = 500_000.0
LLAMA3_MIN_VOCAB = 128_000  # Llama 3's tiktoken vocabulary (128256); Llama 1/2 and Code Llama have 32000/32016

# Every params.json field the reader uses, checked before any arithmetic on it (a string multiplier
# or a dim of 3e9 would otherwise reach meta_ffn_hidden_dim); other keys are ignored.
PARAMS_FIELDS: dict[str, FieldSpec] = {
    "dim": CONFIG_FIELDS["hidden_size"],
    "n_layers": CONFIG_FIELDS["num_hidden_layers"],
    "n_heads": CONFIG_FIELDS["num_attention_heads"],
    "n_kv_heads": CONFIG_FIELDS["num_key_value_heads"].or_null(),
    "norm_eps": CONFIG_FIELDS["rms_norm_eps"],
    "vocab_size": integer(-1, 2**24),  # -1: left to the tokenizer at run time
    "multiple_of": integer(1, 2**20),
    "ffn_dim_multiplier": number(lambda v: 0 < v <= 16, "a finite number in (0, 16]").or_null(),  # 1.3, 1.5 real
    "rope_theta": ROPE_FIELDS["rope_theta"],
    "use_scaled_rope": BOOL,
    "rope_scaling_factor": ROPE_FIELDS["factor"].or_null(),
    "max_seq_len": CONFIG_FIELDS["max_position_embeddings"].or_null(),
}
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "norm_eps")

# Files next to an ``original/`` folder that a converted checkpoint should carry along.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def find_meta_folder(path: str | Path) -> Path | None:
    """The folder holding params.json for ``path`` (that folder, its ``original/``, or a file in it); else None."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    for candidate in (path, path / ORIGINAL_SUBFOLDER):
        if (candidate / PARAMS_NAME).is_file():
            return candidate
    return None


def is_meta_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds (or its ``original/`` holds) params.json and consolidated.*.pth."""
    folder = find_meta_folder(path)
    return folder is not None and any(SHARD_PATTERN.match(p.name) for p in folder.iterdir())


def read_meta_checkpoint(folder: str | Path) -> CheckpointSource:
    """Describe the Meta checkpoint in ``folder`` (or ``folder/original``) in transformers' terms.

    iter_groups() yields the embeddings/final norm/head first, then one dict per decoder layer, each
    merged across all model-parallel files; the files are memory-mapped, so peak memory is about
    one layer. Raises CheckpointNotFoundError without params.json or .pth files,
    CorruptCheckpointError for unreadable files or missing tensors, ShapeMismatchError when
    params.json and the tensors disagree.
    """
    folder = Path(folder)
    root = find_meta_folder(folder)
    if root is None:
        raise CheckpointNotFoundError(
            f"{folder}: no {PARAMS_NAME} here or in {folder / ORIGINAL_SUBFOLDER}; a Meta checkpoint is "
            f"{PARAMS_NAME} + consolidated.00.pth (+ consolidated.01.pth ... for model-parallel shards)"
        )
    params = read_params(root / PARAMS_NAME)
    files = _shard_files(root)
    shards = _open_shards(files)
    for name in shards[0]:
        if name not in META_IGNORED:
            map_name(name, HF_FROM_META, source=str(files[0]))  # unknown tensors fail here, not mid-load

    dtype = _tensor(shards[0], "tok_embeddings.weight", files[0]).dtype  # bfloat16 for every Meta release
    config = config_from_params(params, _vocab_size(params, shards, root / PARAMS_NAME), root, dtype)
    _check_against_tensors(config, params, shards, root / PARAMS_NAME)
    del shards  # iter_groups opens its own maps, so the source can be iterated more than once

    def iter_groups(local: _RankPieces | None = None) -> Iterator[dict[str, Tensor]]:
        open_shards = _open_shards(files)
        yield _merge_group(open_shards, _non_layer_names(), config, files, local)
        for i in range(config.num_hidden_layers):
            yield _merge_group(open_shards, _layer_names(i), config, files, local)

    def iter_rank_groups(rank: int, world_size: int, shard_dim: Callable[[str], int | None]) -> Iterator[dict[str, Tensor]]:
        return iter_groups(_RankPieces(rank, world_size, shard_dim))

    return CheckpointSource(
        format="meta",
        root=root,
        config=config,
        iter_groups=iter_groups,
        num_groups=config.num_hidden_layers + 1,
        dtype=dtype,
        files=[root / PARAMS_NAME, *files],
        tokenizer_files=_tokenizer_files(root),
        # With several ranks every tensor comes from all files, so only a single file is named.
        tensor_files={map_name(n, HF_FROM_META): files[0] for n in _all_names(config)} if len(files) == 1 else {},
        owns_tensors=False,  # single-rank tensors that need no permutation are views of the memory map
        iter_rank_groups=iter_rank_groups,
    )


# ------------------------------------------------------------------------------------------ config
def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size Meta's FeedForward derives from params.json.

    2/3 of 4 * dim (SwiGLU's three matrices then cost what a 4 * dim two-matrix MLP does), scaled
    by ffn_dim_multiplier when given, rounded up to a multiple of multiple_of:
    dim 4096, multiple_of 256 -> 11008 (Llama 2 7B); dim 4096, 1024, 1.3 -> 14336 (Llama 3 8B).
    """
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_context_length(params: dict[str, Any], vocab_size: int) -> int:
    """max_position_embeddings for a params.json, which does not record it (it is a runtime argument
    of Meta's code). The heuristic, the same split transformers' converter makes by llama_version:

    ==============================================  ========  ==========================
    params.json                                     context   models
    ==============================================  ========  ==========================
    "max_seq_len" given                             as given  some re-exports
    "use_scaled_rope": true                         131072    Llama 3.1, 3.2
    rope_theta 500000, or vocab >= 128000           8192      Llama 3
    any other rope_theta > 10000                    16384     Code Llama (theta 1e6)
    otherwise (rope_theta 10000)                    4096      Llama 2 (Llama 1 had 2048)
    ==============================================  ========  ==========================
    """
    theta = float(params.get("rope_theta", 10000.0))
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("use_scaled_rope"):
        return 131072
    if theta == LLAMA3_ROPE_THETA or vocab_size >= LLAMA3_MIN_VOCAB:
        return 8192
    if theta > 10000.0:
        return 16384
    return 4096


def _rope_parameters(params: dict[str, Any]) -> dict[str, Any]:
    theta = float(params.get("rope_theta", 10000.0))
    if not params.get("use_scaled_rope"):
        return {"rope_type": "default", "rope_theta": theta}
    # Llama 3.1 scales by 8; Llama 3.2's params.json may name its factor (32).
    factor = params.get("rope_scaling_factor") or LLAMA3_ROPE_DEFAULTS["factor"]
    return {**LLAMA3_ROPE_DEFAULTS, "rope_type": "llama3", "rope_theta": theta, "factor": float(factor)}


def _special_token_ids(root: Path, vocab_size: int) -> dict[str, Any]:
    """bos/eos ids, which params.json lacks: the Hub's config.json beside ``original/`` when there is
    one; else Llama 3's ids for a tiktoken-sized vocabulary, Llama 1/2's (1, 2) otherwise."""
    hub_config = root.parent / "config.json"
    if root.name == ORIGINAL_SUBFOLDER and hub_config.is_file():
        try:
            hub = read_json_file(hub_config)
        except (OSError, ValueError):
            pass  # a broken sibling config.json is not this reader's business; fall back below
        else:
            ids = {name: hub.get(name) for name in ("bos_token_id", "eos_token_id")}
            fields = token_id_fields(vocab_size)
            for name, value in ids.items():
                fields[name].check(f"{hub_config}: {name}", value, CorruptCheckpointError)
            return ids
    if vocab_size >= LLAMA3_MIN_VOCAB:
        return {"bos_token_id": 128000, "eos_token_id": 128001}
    return {"bos_token_id": 1, "eos_token_id": 2}


def config_from_params(params: dict[str, Any], vocab_size: int, root: Path, dtype: torch.dtype) -> LlamaConfig:
    """The LlamaConfig a params.json checked by read_params describes, for a head of ``vocab_size``
    rows in ``dtype``; bos/eos ids as _special_token_ids finds them beside ``root``. A value
    LlamaConfig refuses (a dim heads do not divide, ...) is a CorruptCheckpointError naming params.json."""
    intermediate = meta_ffn_hidden_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    with refused_as_corrupt(root / PARAMS_NAME):
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=params["dim"],
            intermediate_size=intermediate,
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
            max_position_embeddings=meta_context_length(params, vocab_size),
            rms_norm_eps=float(params["norm_eps"]),
            rope_parameters=_rope_parameters(params),
            tie_word_embeddings=False,  # Meta's LLaMA always has its own output.weight
            dtype=str(dtype).removeprefix("torch."),
            **_special_token_ids(root, vocab_size),
        )


def _vocab_size(params: dict[str, Any], shards: list[dict[str, Tensor]], path: Path) -> int:
    """The vocabulary from the head, which every Llama version splits along dim 0
    (params.json often says vocab_size -1: the tokenizer decided it at run time)."""
    vocab_size = sum(_tensor(s, "output.weight", path).shape[0] for s in shards)
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab_size:
        raise ShapeMismatchError(f"{path}: vocab_size {params['vocab_size']} but output.weight has {vocab_size} rows")
    return vocab_size


def _check_against_tensors(
    config: LlamaConfig, params: dict[str, Any], shards: list[dict[str, Tensor]], path: Path
) -> None:
    """ShapeMismatchError when the FFN size or the layer count params.json implies is not what the
    .pth files hold."""
    stored = sum(_tensor(s, "layers.0.feed_forward.w1.weight", path).shape[0] for s in shards)
    if stored != config.intermediate_size:
        raise ShapeMismatchError(
            f"{path}: dim {params['dim']}, multiple_of {params.get('multiple_of', 256)}, ffn_dim_multiplier "
            f"{params.get('ffn_dim_multiplier')} give an FFN size of {config.intermediate_size}, "
            f"but feed_forward.w1 has {stored} rows"
        )
    stored_layers = 1 + max((int(m.group(1)) for n in shards[0] if (m := re.match(r"layers\.(\d+)\.", n))), default=-1)
    if stored_layers != config.num_hidden_layers:
        raise ShapeMismatchError(
            f"{path}: n_layers is {config.num_hidden_layers} but the .pth files hold {stored_layers} layers"
        )


# ------------------------------------------------------------------------------------------- files
def read_params(path: Path) -> dict[str, Any]:
    """params.json (the dict under "model", where an export nests it there), every field checked
    against PARAMS_FIELDS before any is used: CorruptCheckpointError naming the file and the field."""
    params = read_json_file(path, CorruptCheckpointError)
    if isinstance(params.get("model"), dict):
        params = params["model"]
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise CorruptCheckpointError(
            f"{path}: missing {missing}; Meta's params.json has {', '.join(REQUIRED_PARAMS)}"
        )
    for key, spec in PARAMS_FIELDS.items():
        if key in params:
            spec.check(f"{path}: {key}", params[key], CorruptCheckpointError)
    return params


def _shard_files(root: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth in rank order; all ranks must be there."""
    numbered = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := SHARD_PATTERN.match(p.name)))
    if not numbered:
        raise CheckpointNotFoundError(f"{root}: {PARAMS_NAME} but no consolidated.NN.pth weight files")
    ranks = [rank for rank, _ in numbered]
    if ranks != list(range(len(ranks))):
        raise CorruptCheckpointError(f"{root}: model-parallel files for ranks {ranks}; expected 0..{len(ranks) - 1}")
    return [path for _, path in numbered]


def _open_shards(files: list[Path]) -> list[dict[str, Tensor]]:
    """Each file's state dict, memory-mapped (nothing is read until a tensor is used)."""
    shards = []
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise CorruptCheckpointError(f"{path}: cannot be read by torch.load ({err})") from err
            # Files from torch's legacy (pre-1.6, non-zip) serialisation cannot be mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle/zip errors come in many types
            raise CorruptCheckpointError(f"{path}: cannot be read by torch.load ({type(err).__name__}: {err})") from err
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
        shards.append(state)
    return shards


def _tensor(shard: dict[str, Tensor], name: str, path: Path) -> Tensor:
    if name not in shard:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} is missing from the consolidated.*.pth files")
    return shard[name]


def _tokenizer_files(root: Path) -> list[Path]:
    """The Hub's tokenizer files beside an ``original/`` folder; else Meta's tokenizer.model when it
    is a SentencePiece model (Llama 1/2), which transformers reads. Llama 3's tokenizer.model is a
    tiktoken table that transformers' LlamaTokenizer cannot read, so it is not offered."""
    if root.name == ORIGINAL_SUBFOLDER and (root.parent / "tokenizer.json").is_file():
        return [root.parent / name for name in HF_TOKENIZER_FILES if (root.parent / name).is_file()]
    model = root / "tokenizer.model"
    if model.is_file() and not _is_tiktoken_file(model):
        return [model]
    return []


def _is_tiktoken_file(path: Path) -> bool:
    # tiktoken: text lines "<base64 token> <rank>"; SentencePiece: a binary protobuf.
    with path.open("rb") as f:
        head = f.read(256).split(b"\n", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head) is not None


# ------------------------------------------------------------------------------------------ merging
def _non_layer_names() -> list[str]:
    return [name for name in HF_FROM_META if "{i}" not in name]


def _layer_names(i: int) -> list[str]:
    return [name.format(i=i) for name in HF_FROM_META if "{i}" in name]


def _all_names(config: LlamaConfig) -> list[str]:
    return _non_layer_names() + [name for i in range(config.num_hidden_layers) for name in _layer_names(i)]


@dataclass(frozen=True)
class _RankPieces:
    """One rank of a tensor-parallel load (CheckpointSource.iter_rank_groups): its index, the mesh
    size, and the dimension the load splits each transformers-named parameter along (None: whole)."""

    rank: int
    world_size: int
    shard_dim: Callable[[str], int | None]

    def takes_own_piece(self, name: str, hf_name: str, num_files: int) -> bool:
        """Whether Meta tensor ``name`` can come from this rank's file alone: one file per rank, and
        the load splits it along the dimension Meta's fairscale layer did (q/k/v/w1/w3 rows, wo/w2
        columns; the embedding and head are replicated by the load, so they are merged)."""
        split = META_SHARD_DIM[template_of(name, HF_FROM_META)]
        return num_files == self.world_size > 1 and split is not None and self.shard_dim(hf_name) == split


def _merge_group(
    shards: list[dict[str, Tensor]], names: list[str], config: LlamaConfig, files: list[Path],
    local: _RankPieces | None = None,
) -> dict[str, Tensor]:
    """{transformers name: tensor} for Meta ``names``, each merged across ranks and re-laid-out;
    with ``local``, a tensor split as the load splits it is this rank's file's piece alone."""
    group = {}
    for name in names:
        hf_name = map_name(name, HF_FROM_META, source=str(files[0]))
        if local is not None and local.takes_own_piece(name, hf_name, len(files)):
            path = files[local.rank]
            tensor, parts = _tensor(shards[local.rank], name, path), local.world_size
        else:
            pieces = [_tensor(shard, name, p) for shard, p in zip(shards, files)]
            path, parts = files[0], 1
            tensor = _merge_shards(name, pieces, config, path)
        group[hf_name] = _to_transformers_layout(name, tensor, config, path, parts)
    return group


def _merge_shards(name: str, pieces: list[Tensor], config: LlamaConfig, path: Path) -> Tensor:
    """One tensor from its model-parallel pieces (see names.META_SHARD_DIM)."""
    split_dim = META_SHARD_DIM[template_of(name, HF_FROM_META)]
    if len(pieces) == 1 or split_dim is None:
        return pieces[0]  # replicated on every rank
    if name == "tok_embeddings.weight":
        # Llama 3's VocabParallelEmbedding keeps all `dim` columns and splits the vocabulary.
        split_dim = 0 if pieces[0].shape[1] == config.hidden_size else 1
    shapes = {tuple(p.shape[d] for d in range(p.ndim) if d != split_dim) for p in pieces}
    if len(shapes) != 1:
        raise ShapeMismatchError(
            f"{path}: the model-parallel pieces of {name} disagree off the split dim: {sorted(shapes)}"
        )
    return torch.cat(pieces, dim=split_dim)


def _to_transformers_layout(name: str, tensor: Tensor, config: LlamaConfig, path: Path, parts: int = 1) -> Tensor:
    """Reorder wq/wk rows from Meta's interleaved rotary pairs to transformers' half-split heads.

    parts: how many model-parallel pieces the heads are split into (``tensor`` is one of them).
    The permutation moves rows within a head only, and a piece holds whole heads (rank r's file
    holds heads r * H / parts .. (r + 1) * H / parts - 1, in order), so permuting a piece's H / parts
    heads gives exactly rows r * H * D / parts .. of the permuted whole: rank-to-rank loading is exact."""
    if name.endswith("attention.wq.weight"):
        heads = config.num_attention_heads
    elif name.endswith("attention.wk.weight"):
        heads = config.num_key_value_heads  # under GQA each key head is permuted on its own
    else:
        return tensor
    return interleaved_to_half_split(tensor, heads // parts, config.head_dim, f"{path}: {name}")


__all__ = [
    "config_from_params",
    "find_meta_folder",
    "is_meta_checkpoint",
    "meta_context_length",
    "meta_ffn_hidden_dim",
    "read_meta_checkpoint",
    "read_params",
]
