"""Checkpoint I/O: find a checkpoint (local or Hub), read any format into one description, load it
into a model memory-leanly, save it as transformers does.

    resolve.py   name or path -> local files (huggingface_hub for repo ids, HubOptions); tokenizer
    formats.py   the format registry: which reader claims a local file or folder
    hub.py       config.json + safetensors / pytorch_model.bin, single or sharded
    meta.py      Meta's params.json + consolidated.*.pth      gguf.py   llama.cpp's GGUF
    names.py     the name tables and layout transforms of meta.py and gguf.py
    source.py    CheckpointSource: what every reader returns
    loading.py   load_pretrained (the models' from_pretrained)  saving.py save_pretrained, convert_checkpoint
    atomic.py    replace_folder: every write goes to a temporary folder, then swaps in whole
    errors.py    the exception types

Builds models from llama_port.modeling; the model never imports this package at import time.
Only torch is imported here; safetensors, huggingface_hub, accelerate, gguf, tqdm and transformers
are imported by the functions that use them.
"""

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
)
from .formats import FORMATS, CheckpointFormat, read_local_checkpoint
from .loading import load_pretrained
from .resolve import HubOptions, default_checkpoint, load_tokenizer, open_checkpoint, resolve_checkpoint
from .saving import convert_checkpoint, save_pretrained
from .source import CheckpointSource

__all__ = [
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointNotFoundError",
    "CheckpointSource",
    "CorruptCheckpointError",
    "FORMATS",
    "HubOptions",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnexpectedKeysError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "convert_checkpoint",
    "default_checkpoint",
    "load_pretrained",
    "load_tokenizer",
    "open_checkpoint",
    "read_local_checkpoint",
    "resolve_checkpoint",
    "save_pretrained",
]
