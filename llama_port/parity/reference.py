"""The one loader of the reference model: transformers' own LlamaForCausalLM for a checkpoint.

Everything that compares with transformers (``llama-port parity``, ``llama-port bench``, the tests)
loads the reference here, so it is loaded one way: by transformers' own reader, never through
llama_port's loader, except for Meta checkpoints, which transformers cannot read (see
:func:`load_reference`). :class:`ReferenceLayers` is the same reference one decoder layer at a
time, for layer-streaming parity (parity/stream.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoints import (
    CheckpointSource,
    convert_checkpoint,
    load_tokenizer,
    open_checkpoint,
)
from ..checkpoints.errors import MissingKeysError, first_line, format_keys
from ..dtypes import DTYPES

# A Meta checkpoint streamed is converted in shards this small: the converter holds one in memory.
STREAM_SHARD_SIZE = "1GB"


def load_reference(
    source: CheckpointSource | str | Path,
    dtype: str,
    device: str = "cpu",
    attn: str | None = None,
    workdir: Path | None = None,
) -> nn.Module:
    """transformers' own LlamaForCausalLM for ``source`` (a CheckpointSource or a path), in eval mode.

    dtype: a name from llama_port.dtypes.DTYPES. attn: transformers' attn_implementation (None:
    its default). A GGUF is read by transformers' GGUF loader, dequantized to a plain dense model
    (GgufConfig dequantize=True: with the optional ``kernels`` package transformers would otherwise
    keep the blocks packed and compute through ggml kernels, which is not the model we mirror). A
    Meta checkpoint, which transformers cannot read, is first converted to a Hub folder in
    ``workdir`` (default: a temporary folder, removed once loaded) by llama_port, so that reference
    shares our Meta name mapping. Raises ValueError (one line) when transformers cannot read it.
    """
    if not isinstance(source, CheckpointSource):
        source = open_checkpoint(source)
    if source.format == "meta" and workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return load_reference(source, dtype, device, attn, Path(tmp))
    import transformers

    kwargs: dict[str, Any] = dict(dtype=DTYPES[dtype])
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if source.format == "gguf":
        gguf = source.files[0]
        kwargs.update(gguf_file=gguf.name, quantization_config=transformers.GgufConfig(dequantize=True))
    folder = _reference_folder(source, workdir)
    with transformers_quiet(), gguf_parse_cache():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except OSError as err:  # unreadable files: one line, exit 2
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"transformers cannot load {folder}: {first_line(err)}") from err
    return model.to(device).eval()


def _reference_folder(source: CheckpointSource, workdir: Path | None, max_shard_size: str = "5GB") -> Path:
    """The folder transformers reads ``source`` from: a GGUF's, a Hub checkpoint's, or for a Meta
    checkpoint llama_port's conversion of it into ``workdir``."""
    if source.format == "gguf":
        return source.files[0].parent
    if source.format != "meta":
        return source.root
    folder = workdir / "converted"
    if not folder.exists():
        convert_checkpoint(source.root, folder, max_shard_size=max_shard_size, progress=False)
    return folder


def load_checkpoint_tokenizer(source: CheckpointSource) -> Any | None:
    """The checkpoint's tokenizer (a transformers tokenizer), or None when it ships none."""
    with transformers_quiet():
        return load_tokenizer(source)


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' loading bars and info/warning logs off (we show our own progress), and
    stderr captured: its GGUF reader draws a tqdm bar unconditionally."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def gguf_parse_cache() -> Iterator[None]:
    """While open, ``gguf.GGUFReader(path)`` and ``gguf.get_tensor_name_map(arch, n)`` are memoized.

    transformers' GGUF loading parses the whole file once for the config, once for the weights and
    once for the tokenizer (3.4 s each for SmolLM2's 49k-token vocabulary), and rebuilds the same
    name table 397 times (5 s): 12 s of the 15 s its load took. Both are pure functions of their
    arguments while the file is unchanged; transformers' own code runs on the very objects gguf
    builds, so the reference still depends on no llama_port code (the cache is never open around
    llama_port's checkpoint readers: ``llama-port parity`` opens it around the reference's and
    the tokenizer's loads, and around --against's quantisation check). Reentrant.
    """
    import gguf

    if getattr(gguf.GGUFReader, "memoized", False):
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    reader.memoized = True
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


# ------------------------------------------------------------------------------ streamed reference
EMBEDDING, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class ReferenceLayers:
    """transformers' own model for ``source``, one decoder layer at a time (a LayerStream).

    Modules: transformers' LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding and
    create_causal_mask, instantiated per layer from transformers' config of the checkpoint, with the
    embedding and head as the nn.Embedding / nn.Linear its LlamaModel holds. Weights are read by
    transformers' means, never by llama_port's loader: the safetensors library's safe_open (a file
    mapped per read; the mapping lives as long as the tensors read from it, so only the current
    layer's pages are resident), ``torch.load(mmap=True, weights_only=True)`` for .bin files, as
    transformers reads them; for a GGUF the functions transformers' GGUF loading runs
    for llama (modeling_gguf_pytorch_utils: gguf's dequantize, LlamaTensorProcessor's q/k
    permutation, get_gguf_hf_weights_map's names), tensor by tensor instead of all at once. A Meta
    checkpoint is first converted by llama_port, as load_reference does, into ``workdir`` (default:
    a temporary folder, removed by close()).

    dtype: a name from llama_port.dtypes.DTYPES; attn: transformers' attn_implementation.
    """

    def __init__(
        self, source: CheckpointSource, dtype: str, device: str = "cpu", attn: str = "sdpa", workdir: Path | None = None
    ) -> None:
        import transformers

        self._tmp = tempfile.TemporaryDirectory() if source.format == "meta" and workdir is None else None
        folder = _reference_folder(source, Path(self._tmp.name) if self._tmp else workdir, STREAM_SHARD_SIZE)
        with transformers_quiet(), gguf_parse_cache():
            if source.format == "gguf":
                self.config = transformers.AutoConfig.from_pretrained(str(folder), gguf_file=source.files[0].name)
                self._files = _GgufTensors(source.files[0], self.config)
            else:
                self.config = transformers.AutoConfig.from_pretrained(str(folder))
                weights = sorted(folder.glob("*.safetensors")) if source.format == "meta" else source.files[1:]
                self._files = _StateFiles(weights)
        self.config._attn_implementation = attn
        self.num_hidden_layers = self.config.num_hidden_layers
        self.eos_token_id = self.config.eos_token_id
        self.device = torch.device(device)
        self.backend = attn
        self.read_seconds = 0.0
        self._dtype = DTYPES[dtype]
        from transformers.models.llama import modeling_llama

        self._hf = modeling_llama
        self._rotary = modeling_llama.LlamaRotaryEmbedding(self.config).to(self.device)
        self._embedding: Tensor | None = None  # kept while the head shares it
        self._final: dict[str, Tensor] = {}
        self._mask = self._position_ids = self._position_embeddings = None

    def start(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Embeddings (B, T, C); the mask and rotary tables as transformers' LlamaModel.forward builds them."""
        from transformers.masking_utils import create_causal_mask

        tied = self.config.tie_word_embeddings and not self._files.has(HEAD)
        weight = self._embedding if self._embedding is not None else self._read([EMBEDDING])[EMBEDDING]
        self._embedding = weight if tied else None
        embed = nn.Embedding(*weight.shape, self.config.pad_token_id, _weight=weight, device=self.device)
        hidden = embed(input_ids)  # (B, T, C)
        self._mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None,
            position_ids=position_ids,
        )
        self._position_ids = position_ids
        self._position_embeddings = self._rotary(hidden, position_ids=position_ids)
        return hidden

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[Callable[[Tensor], Tensor]]:
        with torch.device("meta"):
            module = self._hf.LlamaDecoderLayer(self.config, i)
        prefix = f"model.layers.{i}."
        weights = self._read([prefix + name for name, _ in module.named_parameters()])
        module.load_state_dict({name.removeprefix(prefix): t for name, t in weights.items()}, assign=True)
        module.eval()
        yield lambda hidden: module(
            hidden, attention_mask=self._mask, position_ids=self._position_ids,
            position_embeddings=self._position_embeddings,
        )

    def norm(self, hidden: Tensor) -> Tensor:
        if NORM not in self._final:
            self._final[NORM] = self._read([NORM])[NORM]
        norm = self._hf.LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight = nn.Parameter(self._final[NORM], requires_grad=False)
        return norm(hidden)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits (B, T, V): the checkpoint's lm_head, or the embedding when tied and it holds none."""
        if HEAD not in self._final:
            if self._files.has(HEAD) or not self.config.tie_word_embeddings:
                self._final[HEAD] = self._read([HEAD])[HEAD]
            else:
                self._final[HEAD] = self._embedding if self._embedding is not None else self._read([EMBEDDING])[EMBEDDING]
        return torch.nn.functional.linear(hidden, self._final[HEAD])  # nn.Linear(C, V, bias=False)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def _read(self, names: list[str]) -> dict[str, Tensor]:
        """{name: tensor} in the reference's dtype and device, as from_pretrained casts them."""
        started = time.perf_counter()
        tensors = {name: t.to(device=self.device, dtype=self._dtype) for name, t in self._files.read(names).items()}
        self.read_seconds += time.perf_counter() - started
        return tensors


class _StateFiles:
    """Tensors in safetensors or .bin files, read per call: ``safe_open(...).get_tensor`` or
    ``torch.load(mmap=True, weights_only=True)``, each a view of a mapping of its file that is
    unmapped once the tensors read from it are dropped.
    Names are transformers' model names; a bare LlamaModel checkpoint's lack the ``model.`` prefix."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, Path] = {}
        for path in files:
            with _opened(path) as (names, _):
                self._where.update(dict.fromkeys(names, path))

    def has(self, name: str) -> bool:
        return self._spelled(name) is not None

    def read(self, names: list[str]) -> dict[str, Tensor]:
        _check_present(self, names, next(iter(self._where.values()), Path(".")).parent)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[self._spelled(name)], []).append(name)
        tensors = {}
        for path, file_names in by_file.items():
            with _opened(path) as (_, get):
                tensors.update({name: get(self._spelled(name)) for name in file_names})
        return tensors

    def _spelled(self, name: str) -> str | None:
        for key in (name, name.removeprefix("model.")):
            if key in self._where:
                return key
        return None


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[list[str], Callable[[str], Tensor]]]:
    """(tensor names, name -> tensor) of one weights file while it is open."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield list(f.keys()), f.get_tensor
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield list(state), state.__getitem__


def _check_present(files: Any, names: list[str], where: Path) -> None:
    missing = [name for name in names if not files.has(name)]
    if missing:
        raise MissingKeysError(f"{where}: the reference's checkpoint lacks {format_keys(missing)}", missing)


class _GgufTensors:
    """A GGUF read as transformers' legacy GGUF loading reads it for llama
    (modeling_gguf_pytorch_utils.load_gguf_checkpoint, which from_pretrained runs: llama has no
    packed-weights path), one tensor per call: gguf's dequantize, the architecture's tensor
    processor (q/k rows back to transformers' layout), the name map from a model built on meta,
    then ``torch.from_numpy(np.copy(...))``."""

    def __init__(self, path: Path, config: Any) -> None:
        import gguf
        import transformers
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self._path = path
        self._parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        reader = gguf.GGUFReader(str(path))
        architecture = read_field(reader, "general.architecture")[0]
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self._parsed["config"])
        with torch.device("meta"):
            stub = transformers.AutoModelForCausalLM.from_config(config)
        self._key_mapping = get_gguf_hf_weights_map(stub, self._processor)
        self._tensors = {self._key_mapping[t.name]: t for t in reader.tensors if t.name in self._key_mapping}
        self._dequantize = gguf.dequantize

    def has(self, name: str) -> bool:
        return name in self._tensors

    def read(self, names: list[str]) -> dict[str, Tensor]:
        import numpy as np

        _check_present(self, names, self._path)
        tensors = {}
        for name in names:
            tensor = self._tensors[name]
            weights = self._dequantize(tensor.data, tensor.tensor_type)
            result = self._processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=self._key_mapping, parsed_parameters=self._parsed
            )
            assert self._key_mapping[result.name] == name, (tensor.name, result.name)
            tensors[name] = torch.from_numpy(np.copy(result.weights))
        return tensors
