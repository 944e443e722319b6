"""llama.cpp's GGUF format, read through the ``gguf`` package (gguf-py).

One file holds the hyper-parameters (``llama.*`` metadata keys), the tokenizer (``tokenizer.ggml.*``)
and the tensors, each in its own ggml type: F32/F16/BF16 or a block-quantized type (Q4_1, Q8_0,
Q4_K, ...). Reading maps llama.cpp's names to transformers' (names.HF_FROM_GGUF), dequantizes
quantized tensors to float32 with gguf.quants.dequantize, and undoes the q/k row permutation
llama.cpp's converter applied (names.interleaved_to_half_split).

GGUF lists a tensor's dims innermost first (ggml's ``ne``): a (out, in) weight is stored with
shape [in, out]. The torch shape is that list reversed.

gguf-py's reader trusts every count and length in a file (a lying array length makes it loop and
allocate without end, a short file raises IndexError), so the header is walked here first with
each one checked against the file's size and the limits below; then every metadata value read is
checked against ``GGUF_FIELDS``, the specs LlamaConfig's own fields use.

``gguf`` and ``numpy`` are imported inside the functions: importing llama_port needs torch alone.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from ..configuration import CONFIG_FIELDS, ROPE_FIELDS, FieldSpec, LlamaConfig, integer, short_repr
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ShapeMismatchError,
    UnsupportedCheckpointError,
    refused_as_corrupt,
)
from .names import GGUF_ROPE_FREQS, HF_FROM_GGUF, interleaved_to_half_split, layer_index, map_name
from .source import CheckpointSource

GGUF_MAGIC = b"GGUF"
ARCHITECTURE = "llama"

# Far above any real file (a 405B model has ~1100 tensors and ~40 keys; Llama 3's tokenizer arrays
# hold ~670k items in all): gguf-py keeps a numpy view per array item, so items bound its memory.
MAX_GGUF_KEYS = 2**16
MAX_GGUF_TENSORS = 2**16
MAX_GGUF_ARRAY_ITEMS = 2**20  # over all arrays of a file (~1 KB of gguf-py's memory each)
MAX_GGUF_ARRAY_NESTING = 4
GGML_MAX_DIMS = 4


def _per_layer(spec: FieldSpec) -> FieldSpec:
    """A value or a non-empty per-layer list of them (llama.cpp writes head counts either way)."""
    def accepts(value: Any) -> bool:
        return spec.accepts(value) or (isinstance(value, list) and len(value) > 0 and all(map(spec.accepts, value)))

    return FieldSpec(accepts, f"{spec.expected}, or a non-empty list of them (one per layer)")


_STRING = FieldSpec(lambda value: isinstance(value, str), "a string")
_TOKEN_ID = integer(0, 2**31 - 1)  # within the vocabulary: LlamaConfig checks that
# Every llama.* / tokenizer.* / split.* key the reader uses; each is checked when read.
GGUF_FIELDS: dict[str, FieldSpec] = {
    f"{ARCHITECTURE}.embedding_length": CONFIG_FIELDS["hidden_size"],
    f"{ARCHITECTURE}.feed_forward_length": CONFIG_FIELDS["intermediate_size"],
    f"{ARCHITECTURE}.block_count": CONFIG_FIELDS["num_hidden_layers"],
    f"{ARCHITECTURE}.context_length": CONFIG_FIELDS["max_position_embeddings"],
    f"{ARCHITECTURE}.attention.head_count": _per_layer(CONFIG_FIELDS["num_attention_heads"]),
    f"{ARCHITECTURE}.attention.head_count_kv": _per_layer(CONFIG_FIELDS["num_key_value_heads"]),
    f"{ARCHITECTURE}.attention.key_length": CONFIG_FIELDS["head_dim"],
    f"{ARCHITECTURE}.attention.layer_norm_rms_epsilon": CONFIG_FIELDS["rms_norm_eps"],
    f"{ARCHITECTURE}.rope.dimension_count": CONFIG_FIELDS["head_dim"],
    f"{ARCHITECTURE}.rope.freq_base": ROPE_FIELDS["rope_theta"],
    f"{ARCHITECTURE}.rope.scaling.type": _STRING,
    f"{ARCHITECTURE}.rope.scaling.factor": ROPE_FIELDS["factor"],
    f"{ARCHITECTURE}.rope.scale_linear": ROPE_FIELDS["factor"],
    f"{ARCHITECTURE}.rope.scaling.original_context_length": ROPE_FIELDS["original_max_position_embeddings"],
    f"{ARCHITECTURE}.rope.scaling.yarn_beta_fast": ROPE_FIELDS["beta_fast"],
    f"{ARCHITECTURE}.rope.scaling.yarn_beta_slow": ROPE_FIELDS["beta_slow"],
    f"{ARCHITECTURE}.expert_count": integer(0, 2**16),
    "split.count": integer(0, 2**16),
    "tokenizer.ggml.bos_token_id": _TOKEN_ID,
    "tokenizer.ggml.eos_token_id": _TOKEN_ID,
    "tokenizer.ggml.padding_token_id": _TOKEN_ID,
}


def is_gguf_file(path: str | Path) -> bool:
    """True for an existing file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_gguf_checkpoint(file: str | Path) -> CheckpointSource:
    """Describe the GGUF ``file`` in transformers' terms.

    dtype: float32 when any weight matrix is quantized (what dequantization produces), else the
    files' own F32/F16/BF16. Without an ``output.weight`` the head is tied to the embedding
    (tie_word_embeddings=True) and no lm_head tensor is yielded. iter_groups() yields the
    embeddings/final norm/head first, then one dict per layer. tokenizer_files is empty: the
    tokenizer lives in the GGUF's metadata (transformers builds it with ``gguf_file=``).

    Raises CheckpointNotFoundError for a missing file, CorruptCheckpointError for one gguf cannot
    parse, UnsupportedCheckpointError for another architecture, a split or mixture-of-experts file,
    an unknown tensor or a ggml type gguf cannot dequantize.
    """
    from gguf import GGUFReader

    path = Path(file)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such GGUF file")
    _check_header(path)
    try:
        reader = GGUFReader(path)
    except ValueError as err:  # what the walk above leaves to gguf: alignment, tensor names, row sizes
        raise CorruptCheckpointError(f"{path}: not a GGUF file gguf can parse ({err})") from err

    metadata = _Metadata(reader, path)
    architecture = metadata.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise UnsupportedCheckpointError(
            f"{path}: general.architecture is {short_repr(architecture)}; "
            f"llama_port reads only {ARCHITECTURE!r} GGUF files"
        )
    if metadata.get("split.count", 1) > 1:
        raise UnsupportedCheckpointError(
            f"{path}: part of a {metadata.get('split.count')}-file split GGUF; merge it first "
            "(llama.cpp's `llama-gguf-split --merge`)"
        )
    if metadata.get("llama.expert_count", 0) > 0:
        raise UnsupportedCheckpointError(f"{path}: a mixture-of-experts model (llama.expert_count > 0); LLaMA is dense")

    tensors = {t.name: t for t in reader.tensors}
    for name, tensor in tensors.items():
        if name != GGUF_ROPE_FREQS:
            map_name(name, HF_FROM_GGUF, source=str(path))  # unknown tensors fail here, not mid-load
        _check_dequantizable(tensor, path)

    dtype = _checkpoint_dtype(tensors.values())
    with refused_as_corrupt(path):
        config = _config_from_metadata(metadata, tensors, path, dtype)

    by_layer: dict[int | None, list[str]] = {}
    for name in tensors:
        if name != GGUF_ROPE_FREQS:
            by_layer.setdefault(layer_index(name), []).append(name)
    stored_layers = 1 + max((i for i in by_layer if i is not None), default=-1)
    if stored_layers != config.num_hidden_layers:
        raise ShapeMismatchError(
            f"{path}: llama.block_count is {config.num_hidden_layers} but the file holds {stored_layers} layers"
        )

    def iter_groups() -> Iterator[dict[str, Tensor]]:
        for key in [None, *range(config.num_hidden_layers)]:
            group = {}
            for name in by_layer.get(key, []):
                hf_name = map_name(name, HF_FROM_GGUF, source=str(path))
                group[hf_name] = _to_transformers_layout(name, _to_torch(tensors[name], path), config, path)
            yield group

    return CheckpointSource(
        format="gguf",
        root=path.parent,
        config=config,
        iter_groups=iter_groups,
        num_groups=config.num_hidden_layers + 1,
        dtype=dtype,
        files=[path],
        tokenizer_files=[],
        tensor_files={map_name(n, HF_FROM_GGUF): path for n in tensors if n != GGUF_ROPE_FREQS},
        owns_tensors=True,  # _to_torch always copies out of the read-only memory map
    )


# ------------------------------------------------------------------------------------------ header
class _HeaderWalk:
    """One pass over a GGUF header (magic, version, counts, metadata, tensor infos) that checks
    every count and length against the bytes left and the MAX_GGUF_* limits, and that each
    tensor's data lies inside the file. Raises CorruptCheckpointError naming what and where."""

    def __init__(self, path: Path, data: mmap.mmap) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf import GGUFValueType as V

        self.path, self.data, self.offset, self.items = path, data, 0, 0
        self.byteorder: str = "little"
        self.alignment = 32  # GGUF's default, unless general.alignment says otherwise
        self.quant_sizes, self.quant_types, self.value_types = GGML_QUANT_SIZES, GGMLQuantizationType, V
        self.scalar_sizes = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4,
                             V.INT32: 4, V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}  # fmt: skip

    def fail(self, problem: str) -> NoReturn:
        raise CorruptCheckpointError(f"{self.path}: {problem}")

    def take(self, size: int, what: str) -> int:
        """Step over ``size`` bytes of ``what``; where they start."""
        start = self.offset
        if size > len(self.data) - start:
            self.fail(
                f"{what} at byte {start} needs {size} bytes, past the end of the file ({len(self.data)} bytes): "
                "truncated, or a count or length in the header is wrong"
            )
        self.offset += size
        return start

    def uint(self, size: int, what: str) -> int:
        start = self.take(size, what)
        return int.from_bytes(self.data[start : start + size], self.byteorder)

    def string(self, what: str) -> bytes:
        size = self.uint(8, f"the length of {what}")
        start = self.take(size, what)
        return self.data[start : start + size]

    def name(self, what: str) -> str:
        try:
            return self.string(what).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.offset} is not UTF-8")

    def value(self, value_type: int, what: str, depth: int = 0) -> None:
        """Step over one metadata value; arrays count against MAX_GGUF_ARRAY_ITEMS."""
        V = self.value_types
        if value_type in self.scalar_sizes:
            self.take(self.scalar_sizes[value_type], what)
        elif value_type == V.STRING:
            self.string(what)
        elif value_type == V.ARRAY and depth < MAX_GGUF_ARRAY_NESTING:
            item_type = self.uint(4, f"the item type of {what}")
            count = self.uint(8, f"the length of {what}")
            self.items += count
            if self.items > MAX_GGUF_ARRAY_ITEMS:
                self.fail(f"{what} has {count} items; a GGUF's arrays may hold {MAX_GGUF_ARRAY_ITEMS} in all")
            if item_type in self.scalar_sizes:
                self.take(count * self.scalar_sizes[item_type], what)
            else:
                for _ in range(count):
                    self.value(item_type, what, depth + 1)
        else:
            self.fail(f"{what} has value type {value_type} at byte {self.offset}: unknown, or arrays nested too deep")

    def walk(self) -> None:
        self.take(len(GGUF_MAGIC), "the magic")  # checked by _check_header
        version = self.uint(4, "the version")
        if version & 0xFFFF == 0:  # as gguf-py: a file written on a machine of the other byte order
            self.byteorder = "big"
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            self.fail(f"GGUF version {version}; gguf reads versions 2 and 3")
        tensor_count, kv_count = self.uint(8, "tensor_count"), self.uint(8, "kv_count")
        limits = (("tensor_count", tensor_count, MAX_GGUF_TENSORS), ("kv_count", kv_count, MAX_GGUF_KEYS))
        for field, count, limit in limits:
            if count > limit:
                self.fail(f"header {field} is {count}; at most {limit} are read")
        keys: set[str] = set()
        for i in range(kv_count):
            key = self.name(f"the name of metadata key #{i}")
            if key in keys:
                self.fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            value_type = self.uint(4, f"the type of metadata {key!r}")
            if key == "general.alignment":
                self.alignment = self._alignment(value_type)
            else:
                self.value(value_type, f"metadata {key!r}")
        tensors = [self._tensor_info(i) for i in range(tensor_count)]
        data_start = -(-self.offset // self.alignment) * self.alignment
        for name, start, size in tensors:
            if data_start + start + size > len(self.data):
                self.fail(
                    f"tensor {name!r} needs bytes {data_start + start}..{data_start + start + size}, past the end "
                    f"of the file ({len(self.data)} bytes): truncated, or its offset in the header is wrong"
                )
        # Past the last tensor there is at most its alignment padding; more means the header
        # describes less than the file holds (a tensor_count too small), so offsets are misread.
        data_end = max((data_start + start + size for _, start, size in tensors), default=data_start)
        if len(self.data) - data_end >= self.alignment:
            self.fail(
                f"{len(self.data) - data_end} bytes follow the last tensor the header describes: "
                "a count in the header is wrong, or this is not one GGUF file"
            )

    def _alignment(self, value_type: int) -> int:
        alignment = self.uint(4, "metadata 'general.alignment'") if value_type == self.value_types.UINT32 else 0
        if alignment == 0 or alignment & (alignment - 1):
            self.fail("metadata 'general.alignment' is not a uint32 power of two")
        return alignment

    def _tensor_info(self, i: int) -> tuple[str, int, int]:
        """(name, data offset, data bytes) of tensor #i, its dims and ggml type checked."""
        name = self.name(f"the name of tensor #{i}")
        n_dims = self.uint(4, f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            self.fail(f"tensor {name!r} has {n_dims} dimensions; ggml tensors have 1 to {GGML_MAX_DIMS}")
        dims = [self.uint(8, f"the shape of tensor {name!r}") for _ in range(n_dims)]
        if 0 in dims:
            self.fail(f"tensor {name!r} has shape {dims} (innermost first); every dimension must be positive")
        raw_type = self.uint(4, f"the ggml type of tensor {name!r}")
        try:
            ggml_type = self.quant_types(raw_type)
        except ValueError:
            raise UnsupportedCheckpointError(
                f"{self.path}: tensor {name!r} has ggml type {raw_type}, which this gguf package does not know"
            ) from None
        block_size, type_size = self.quant_sizes[ggml_type]
        start = self.uint(8, f"the data offset of tensor {name!r}")
        return name, start, math.prod(dims) * type_size // block_size


def _check_header(path: Path) -> None:
    """CorruptCheckpointError unless ``path`` starts with GGUF's magic and _HeaderWalk passes it."""
    with path.open("rb") as f:
        if path.stat().st_size < 4 or f.read(4) != GGUF_MAGIC:
            raise CorruptCheckpointError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _HeaderWalk(path, data).walk()


# ---------------------------------------------------------------------------------------- metadata
class _Metadata:
    """``reader.fields`` as plain Python values (ints, floats, strs, bools, lists), each key of
    GGUF_FIELDS checked against its spec when read."""

    _REQUIRED = object()

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields = reader.fields
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.fields:
            if default is self._REQUIRED:
                raise CorruptCheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        value = self.fields[key].contents()
        value = value.item() if hasattr(value, "item") else value  # numpy scalars -> Python
        if key in GGUF_FIELDS:
            GGUF_FIELDS[key].check(f"{self.path}: {key}", value, CorruptCheckpointError)
        return value


def _config_from_metadata(metadata: _Metadata, tensors: dict[str, Any], path: Path, dtype: torch.dtype) -> LlamaConfig:
    arch = ARCHITECTURE
    hidden_size = metadata.get(f"{arch}.embedding_length")
    n_heads = _one_value(metadata.get(f"{arch}.attention.head_count"), f"{arch}.attention.head_count", path)
    kv_key = f"{arch}.attention.head_count_kv"
    n_kv_heads = _one_value(metadata.get(kv_key, n_heads), kv_key, path)
    head_dim = metadata.get(f"{arch}.attention.key_length", hidden_size // n_heads)
    rope_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedCheckpointError(
            f"{path}: {arch}.rope.dimension_count {rope_dim} != head_dim {head_dim}; LLaMA rotates whole heads"
        )
    if "token_embd.weight" not in tensors:
        raise CorruptCheckpointError(f"{path}: no token_embd.weight tensor")
    # ne = [hidden, vocab]: the vocabulary is what the weights hold (tokenizer.ggml.tokens may be shorter).
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    max_positions = metadata.get(f"{arch}.context_length", 2048)

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=metadata.get(f"{arch}.feed_forward_length"),
        num_hidden_layers=metadata.get(f"{arch}.block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=metadata.get(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_parameters=_rope_parameters(metadata, tensors, path, head_dim, max_positions),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id", None),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        dtype=str(dtype).removeprefix("torch."),
    )


def _one_value(value: Any, key: str, path: Path) -> int:
    # Some architectures give per-layer head counts as an array; LLaMA's are uniform.
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedCheckpointError(f"{path}: {key} varies by layer ({value}); LLaMA layers are uniform")
        value = value[0]
    return value


def _rope_parameters(
    metadata: _Metadata, tensors: dict[str, Any], path: Path, head_dim: int, max_positions: int
) -> dict[str, Any]:
    """rope_parameters from llama.rope.* and, for Llama 3.1-style scaling, the rope_freqs tensor.

    llama.cpp writes linear and YaRN scaling as metadata, but Llama 3.1's as a tensor of
    per-frequency divisors; that tensor is accepted when it equals transformers' llama3 scaling with
    factor = its largest divisor, low/high frequency factors 1 and 4 and an original context of
    rope.scaling.original_context_length or 8192 (every Llama 3.1/3.2 release).
    """
    arch = ARCHITECTURE
    theta = metadata.get(f"{arch}.rope.freq_base", 10000.0)
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear", None))
    original = metadata.get(f"{arch}.rope.scaling.original_context_length", None)

    if GGUF_ROPE_FREQS in tensors:
        freqs = _to_torch(tensors[GGUF_ROPE_FREQS], path).float()
        return _llama3_from_rope_freqs(freqs, theta, head_dim, original, path)
    if scaling == "linear" or (scaling == "none" and factor not in (None, 1.0)):
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if scaling == "yarn":
        params = {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": factor,
            "original_max_position_embeddings": original or max_positions,
        }
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = metadata.get(f"{arch}.rope.scaling.{gguf_key}", None)
            if value is not None:
                params[hf_key] = value
        return params
    if scaling != "none":
        raise UnsupportedCheckpointError(
            f"{path}: {arch}.rope.scaling.type {scaling!r}; expected one of ['none', 'linear', 'yarn']"
        )
    return {"rope_type": "default", "rope_theta": theta}


def _llama3_from_rope_freqs(
    freqs: Tensor, theta: float, head_dim: int, original: int | None, path: Path
) -> dict[str, Any]:
    from ..rope import llama3_inv_freq

    if freqs.shape != (head_dim // 2,):
        raise ShapeMismatchError(
            f"{path}: {GGUF_ROPE_FREQS} has shape {tuple(freqs.shape)}; expected ({head_dim // 2},)"
        )
    if torch.all(freqs == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original or 8192,
    }
    probe = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, rope_parameters=params)
    inv_freq, _ = llama3_inv_freq(probe)
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not torch.allclose(inv_freq, base / freqs, rtol=1e-4, atol=0.0):
        raise UnsupportedCheckpointError(
            f"{path}: {GGUF_ROPE_FREQS} holds per-frequency rotary factors that are not Llama 3.1's scaling "
            f"(tried {params}); transformers' rope_parameters cannot express them"
        )
    return params


# ----------------------------------------------------------------------------------------- tensors
def _float_types() -> dict:
    from gguf import GGMLQuantizationType as T

    return {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16, T.F64: torch.float64}


def _check_dequantizable(tensor: Any, path: Path) -> None:
    """UnsupportedCheckpointError now, not mid-load, for a ggml type gguf cannot dequantize."""
    from gguf.quants import dequantize

    if tensor.tensor_type in _float_types():
        return
    first_row = tensor.data.reshape(-1, tensor.data.shape[-1])[:1]
    try:
        dequantize(first_row, tensor.tensor_type)
    except NotImplementedError as err:
        raise UnsupportedCheckpointError(
            f"{path}: tensor {tensor.name!r} has ggml type {tensor.tensor_type.name}, which gguf "
            f"{_gguf_version()} cannot dequantize ({err})"
        ) from err


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def _checkpoint_dtype(tensors: Any) -> torch.dtype:
    """The weight matrices' common float type; float32 when any is quantized or they differ."""
    float_types = _float_types()
    matrix_types = {t.tensor_type for t in tensors if len(t.shape) >= 2}
    if len(matrix_types) == 1 and (only := next(iter(matrix_types))) in float_types:
        return float_types[only]
    return torch.float32


def _to_torch(tensor: Any, path: Path) -> Tensor:
    """The tensor in torch's (outermost-first) shape: float types as stored, quantized ones
    dequantized to float32. Always a copy, never a view of the read-only memory map."""
    import numpy as np
    from gguf.quants import dequantize

    from gguf import GGMLQuantizationType as T

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne is innermost-first
    qtype = tensor.tensor_type
    if qtype == T.BF16:
        # The reader hands BF16 over as raw bytes (rows, 2 * cols); reinterpreting keeps it exact.
        out = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).view(torch.bfloat16)
    elif qtype in _float_types():
        data = tensor.data
        out = torch.from_numpy(np.array(data, dtype=data.dtype.newbyteorder("=")))  # native byte order for torch
    else:
        out = torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, qtype), dtype=np.float32))
    if out.numel() != int(tensor.n_elements):
        raise CorruptCheckpointError(
            f"{path}: tensor {tensor.name!r} holds {out.numel()} values; its shape {shape} needs {tensor.n_elements}"
        )
    return out.reshape(shape)


def _to_transformers_layout(name: str, tensor: Tensor, config: LlamaConfig, path: Path) -> Tensor:
    """Undo llama.cpp's q/k row permutation (weights and biases) back to transformers' half-split heads."""
    if ".attn_q." in name:
        heads = config.num_attention_heads
    elif ".attn_k." in name:
        heads = config.num_key_value_heads  # under GQA the key heads are permuted on their own
    else:
        return tensor
    return interleaved_to_half_split(tensor, heads, config.head_dim, f"{path}: {name}")


__all__ = ["is_gguf_file", "read_gguf_checkpoint"]
