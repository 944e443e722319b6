"""The one loader of the reference model: transformers' own LlamaForCausalLM for a checkpoint.

Everything that compares with transformers (``llama-port parity``, ``llama-port bench``, the tests)
loads the reference here, so it is loaded one way: by transformers' own reader, never through
llama_port's loader, except for Meta checkpoints, which transformers cannot read (see
:func:`load_reference`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoints import CheckpointSource, convert_checkpoint, load_tokenizer, open_checkpoint
from ..checkpoints.errors import first_line
from ..dtypes import DTYPES


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
        folder = gguf.parent
        kwargs.update(gguf_file=gguf.name, quantization_config=transformers.GgufConfig(dequantize=True))
    elif source.format == "meta":
        folder = workdir / "converted"
        if not folder.exists():
            convert_checkpoint(source.root, folder, progress=False)
    else:
        folder = source.root
    with transformers_quiet():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except OSError as err:  # unreadable files: one line, exit 2
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"transformers cannot load {folder}: {first_line(err)}") from err
    return model.to(device).eval()


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
