"""Checkpoint I/O: find a checkpoint (local or Hub), read any format into one description, load it
into a model memory-leanly, save it as transformers does.

    resolve.py   name or path -> local files (huggingface_hub for repo ids); which reader; tokenizer
    hub.py       config.json + safetensors / pytorch_model.bin, single or sharded
    meta.py      Meta's params.json + consolidated.*.pth      gguf.py   llama.cpp's GGUF
    names.py     the name tables and layout transforms of meta.py and gguf.py
    source.py    CheckpointSource: what every reader returns
    loading.py   from_pretrained (CheckpointMixin)            saving.py save_pretrained, convert_checkpoint
    errors.py    the exception types

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
from .loading import CheckpointMixin, load_pretrained
from .resolve import default_checkpoint, load_tokenizer, open_checkpoint, resolve_checkpoint
from .saving import convert_checkpoint, save_pretrained
from .source import CheckpointSource

__all__ = [
    "CheckpointError",
    "CheckpointMixin",
    "CheckpointNotFoundError",
    "CheckpointSource",
    "CorruptCheckpointError",
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
    "resolve_checkpoint",
    "save_pretrained",
]
