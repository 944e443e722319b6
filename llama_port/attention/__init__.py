"""Attention backends: one contract, a registry by name.

Every backend is a plain function

    fn(module, query, key, value, mask, scaling, dropout) -> (attn_output (B, T, H, D), weights | None)

with query (B, H, T, D) and key/value (B, Hkv, S, D), S = cached + T. ``module`` is the
LlamaAttention layer (num_key_value_groups, head_dim, layer_idx, training). What ``mask`` is
depends on the backend's ``mask_format``; masks.py builds (and, for the decode loop, updates)
every format, once per forward. A new backend is one file here and one ``register_backend`` line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .eager import eager_attention_forward
from .flash import (
    check_flash_attention_2_available,
    flash_attention_2_forward,
    flash_attn_is_usable,
    flash_reference_forward,
)
from .masks import BackendMask, DecodeMask, PreparedMask, VarlenMask, build_attention_mask, mask_for_forward
from .sdpa import sdpa_attention_forward

logger = logging.getLogger("llama_port")

AttentionFn = Callable[[nn.Module, Tensor, Tensor, Tensor, BackendMask, float, float], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention function and what it needs.

    mask_format: "additive", "bool" or "varlen" (see masks.py).
    check_available: called when a model selects the backend, with the model's device; raises a
        clear error if the backend cannot run there (missing package, no CUDA).
    returns_weights: whether ``output_attentions`` can be honoured.
    reference_name: transformers' attn_implementation computing the same attention (what the
        parity tool runs the reference with).
    """

    name: str
    forward: AttentionFn
    mask_format: str
    check_available: Callable[[torch.device | None], None] | None = None
    returns_weights: bool = False
    reference_name: str | None = None

    def __post_init__(self) -> None:
        if self.reference_name is None:
            object.__setattr__(self, "reference_name", self.name)


BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; ValueError listing the choices otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation={name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name]


register_backend(AttentionBackend("eager", eager_attention_forward, "additive", returns_weights=True))
register_backend(AttentionBackend("sdpa", sdpa_attention_forward, "bool"))
register_backend(
    AttentionBackend("flash_attention_2", flash_attention_2_forward, "varlen", check_flash_attention_2_available)
)
# transformers has no pure-PyTorch flash kernel: sdpa is the same attention on any device.
register_backend(AttentionBackend("flash_reference", flash_reference_forward, "varlen", reference_name="sdpa"))

_announced: set[str] = set()


def default_attn_implementation(device: torch.device | None, dtype: torch.dtype | None) -> str:
    """The backend used when none is asked for: flash_attention_2 when flash_attn imports, the model
    is on CUDA and in fp16/bf16; sdpa otherwise. Says its choice once per process in the log."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    name = "flash_attention_2" if on_cuda and half and flash_attn_is_usable() else "sdpa"
    if name not in _announced:
        _announced.add(name)
        logger.info("llama_port: attention backend %s (device=%s, dtype=%s)", name, device, dtype)
    return name


__all__ = [
    "AttentionBackend",
    "BACKENDS",
    "BackendMask",
    "DecodeMask",
    "PreparedMask",
    "VarlenMask",
    "build_attention_mask",
    "default_attn_implementation",
    "get_backend",
    "mask_for_forward",
    "register_backend",
]
