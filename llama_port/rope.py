"""Rotary position embedding (RoPE, Su et al. 2021): everything about each rope type, and its use.

``ROPE_TYPES`` is the one table of rope types: for each, the function computing its inverse
frequencies, the keys ``rope_parameters`` must hold, and its behaviour flags (whether its
frequencies change with the position, whether it extrapolates past max_position_embeddings).
configuration.py validates against it, the model's rotary module and generate() read its flags:
a new rope type is one function here and one row in the table.

Each ``*_inv_freq`` function maps a config to ``(inv_freq (D/2,) float32, attention_scaling)``,
where ``attention_scaling`` multiplies cos and sin (only yarn and longrope use it). They repeat the
arithmetic of transformers' ``modeling_rope_utils`` operation for operation, so the frequencies are
bit-identical; ``seq_len`` matters to dynamic (NTK) and longrope only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: configuration.py reads this module's table
    from .configuration import LlamaConfig

RopeInit = Callable[..., tuple[Tensor, float]]


def _base_and_dim(config: LlamaConfig) -> tuple[float, int]:
    return config.rope_parameters["rope_theta"], config.head_dim


def _exponents(dim: int, device: torch.device | None) -> Tensor:
    """(D/2,) float32: 0, 2, 4, ... divided by dim; the exponent of theta per frequency."""
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def default_inv_freq(config: LlamaConfig, device: torch.device | None = None, seq_len: int | None = None):
    """Original RoPE: inv_freq[i] = theta ** (-2i / D)."""
    base, dim = _base_and_dim(config)
    return 1.0 / (base ** _exponents(dim, device)), 1.0


def linear_inv_freq(config: LlamaConfig, device: torch.device | None = None, seq_len: int | None = None):
    """Position interpolation (kaiokendev): every frequency divided by ``factor``."""
    base, dim = _base_and_dim(config)
    inv_freq = 1.0 / (base ** _exponents(dim, device))
    inv_freq /= config.rope_parameters["factor"]
    return inv_freq, 1.0


def dynamic_inv_freq(config: LlamaConfig, device: torch.device | None = None, seq_len: int | Tensor | None = None):
    """Dynamic NTK scaling: theta grows with the sequence once it passes max_position_embeddings."""
    base, dim = _base_and_dim(config)
    factor = config.rope_parameters["factor"]
    max_pos = config.max_position_embeddings
    if seq_len is None:
        seq_len = max_pos
    elif isinstance(seq_len, Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim, device)), 1.0


def yarn_inv_freq(config: LlamaConfig, device: torch.device | None = None, seq_len: int | None = None):
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, blend by a linear ramp."""
    params = config.rope_parameters
    base, dim = _base_and_dim(config)
    factor = params["factor"]
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    original_max = params["original_max_position_embeddings"]

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength makes num_rotations turns over the original context.
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def longrope_inv_freq(config: LlamaConfig, device: torch.device | None = None, seq_len: int | None = None):
    """LongRoPE (Ding et al. 2024): per-frequency factors, the long set past the original context."""
    params = config.rope_parameters
    base, dim = _base_and_dim(config)
    original_max = params["original_max_position_embeddings"]
    factor = params.get("factor")
    attention_factor = params.get("attention_factor")
    if factor is None:
        factor = config.max_position_embeddings / original_max
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    key = "long_factor" if seq_len and seq_len > original_max else "short_factor"
    ext_factors = torch.tensor(params[key], dtype=torch.float32, device=device)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext_factors * base**exponents), attention_factor


def llama3_inv_freq(config: LlamaConfig, device: torch.device | None = None, seq_len: int | None = None):
    """Llama 3.1's scaling: low frequencies / factor, high ones kept, a smooth blend in between."""
    params = config.rope_parameters
    inv_freq, _ = default_inv_freq(config, device)
    factor = params["factor"]  # 8 for Llama 3.1, 32 for Llama 3.2
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


class RotaryState(Protocol):
    """What a position-dependent rope type updates: the rotary module's frequency state."""

    config: Any
    inv_freq: Tensor
    original_inv_freq: Tensor
    attention_scaling: float
    max_seq_len_cached: int
    original_max_seq_len: int
    long_inv_freq: Tensor | None


@torch.no_grad()
def dynamic_update(rotary: RotaryState, position_ids: Tensor) -> None:
    """Dynamic NTK, statefully as transformers: the frequencies grow once positions pass the longest
    seen, and return to the trained ones when a sequence inside the trained range comes back."""
    # parity: a tensor, as in transformers, so dynamic NTK computes its base in float32 too.
    seq_len = torch.max(position_ids) + 1
    if seq_len > rotary.max_seq_len_cached:  # growth
        rotary.inv_freq, rotary.attention_scaling = compute_inv_freq(rotary.config, rotary.inv_freq.device, seq_len)
        rotary.max_seq_len_cached = int(seq_len)
    if seq_len < rotary.original_max_seq_len < rotary.max_seq_len_cached:  # back to the trained range
        rotary.inv_freq = rotary.original_inv_freq
        rotary.max_seq_len_cached = rotary.original_max_seq_len


@torch.no_grad()
def longrope_update(rotary: RotaryState, position_ids: Tensor) -> None:
    """LongRoPE: the long factors past the original context, the short ones within it."""
    seq_len = torch.max(position_ids) + 1
    original_max = rotary.config.rope_parameters["original_max_position_embeddings"]
    device = rotary.inv_freq.device
    if rotary.long_inv_freq is None or rotary.long_inv_freq.device != device:  # computed once
        rotary.long_inv_freq, _ = compute_inv_freq(rotary.config, device, original_max + 1)
    rotary.inv_freq = rotary.long_inv_freq if seq_len > original_max else rotary.original_inv_freq


def _check_llama3(params: dict[str, Any], head_dim: int) -> None:
    if not params["high_freq_factor"] > params["low_freq_factor"]:
        raise ValueError(
            "LlamaConfig.rope_parameters: llama3 needs high_freq_factor > low_freq_factor, got "
            f"{params['high_freq_factor']} and {params['low_freq_factor']}"
        )


def _check_dynamic(params: dict[str, Any], head_dim: int) -> None:
    if head_dim <= 2:  # dynamic_inv_freq raises theta to dim / (dim - 2)
        raise ValueError(f"LlamaConfig.rope_parameters: dynamic needs head_dim > 2, got {head_dim}")


def _check_longrope(params: dict[str, Any], head_dim: int) -> None:
    if params["original_max_position_embeddings"] < 2:  # its attention factor divides by log(original)
        raise ValueError(
            "LlamaConfig.rope_parameters: longrope needs original_max_position_embeddings >= 2, got "
            f"{params['original_max_position_embeddings']}"
        )
    for key in ("short_factor", "long_factor"):
        if len(params[key]) != head_dim // 2:
            raise ValueError(
                f"LlamaConfig.rope_parameters['{key}'] has {len(params[key])} entries; expected head_dim // 2 = "
                f"{head_dim // 2}"
            )


@dataclass(frozen=True)
class RopeType:
    """One rope type.

    init: ``(config, device, seq_len) -> (inv_freq (D/2,) float32, attention_scaling)``.
    required_keys: keys rope_parameters must hold (rope_type and rope_theta always do); mirrors
        transformers' ``_validate_<type>_rope_parameters``.
    uses_original_max: ``original_max_position_embeddings`` belongs in rope_parameters (filled from
        the top-level key or max_position_embeddings when absent, as transformers standardises it).
    update: called with the rotary module and the positions before each forward, for types whose
        frequencies depend on the sequence length; None for the others. A type with an update is
        position-dependent: one compiled decode graph cannot capture it.
    extrapolates: generating past max_position_embeddings is allowed (with a warning).
    check: extra validation of rope_parameters beyond the required keys (ValueError naming the key).
    """

    init: RopeInit
    required_keys: tuple[str, ...] = ()
    uses_original_max: bool = False
    update: Callable[[RotaryState, Tensor], None] | None = None
    extrapolates: bool = False
    check: Callable[[dict[str, Any], int], None] | None = None

    @property
    def position_dependent(self) -> bool:
        return self.update is not None


ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType(default_inv_freq),
    "linear": RopeType(linear_inv_freq, ("factor",)),
    "dynamic": RopeType(dynamic_inv_freq, ("factor",), update=dynamic_update, extrapolates=True, check=_check_dynamic),
    "yarn": RopeType(yarn_inv_freq, ("factor", "original_max_position_embeddings"), uses_original_max=True),
    "longrope": RopeType(
        longrope_inv_freq,
        ("short_factor", "long_factor", "original_max_position_embeddings"),
        uses_original_max=True,
        update=longrope_update,
        check=_check_longrope,
    ),
    "llama3": RopeType(
        llama3_inv_freq,
        ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
        uses_original_max=True,
        check=_check_llama3,
    ),
}


def compute_inv_freq(
    config: LlamaConfig, device: torch.device | None = None, seq_len: int | Tensor | None = None
) -> tuple[Tensor, float]:
    """``(inv_freq (head_dim/2,) float32, attention_scaling)`` for ``config.rope_parameters``."""
    return ROPE_TYPES[config.rope_parameters["rope_type"]].init(config, device, seq_len)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: the half-split layout transformers' checkpoints use."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by cos/sin (B, T, D), broadcast over heads."""
    cos = cos.unsqueeze(1)  # (B, 1, T, D)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
