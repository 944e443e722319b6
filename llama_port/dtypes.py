"""The floating dtypes llama_port loads, computes and saves in, by name: one table for every module.

``DTYPES`` maps names (as config.json's ``dtype`` and the CLI spell them) to torch dtypes;
``COMPUTE_DTYPES`` are the ones a model runs in for parity, generation and benchmarks.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# What a checkpoint may store: the dtypes above, and float8, which a model does not compute in and
# which is therefore read only when converted to one of DTYPES (an explicit dtype=).
STORED_DTYPES = (*DTYPES.values(), torch.float8_e4m3fn, torch.float8_e5m2)
LOW_PRECISION_DTYPES = ("bfloat16", "float16")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype | None, torch_dtype: str | torch.dtype | None = None) -> torch.dtype | None:
    """The requested floating dtype, or None for "auto" / None. ``torch_dtype`` is dtype's older
    name (transformers 4); ValueError if both are given and disagree, or for an unknown dtype."""
    if torch_dtype is not None:
        if dtype not in (None, "auto") and parse_dtype(dtype) != parse_dtype(torch_dtype):
            raise ValueError(
                f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one (torch_dtype is dtype's old name)"
            )
        dtype = torch_dtype
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r}; expected 'auto', one of {sorted(DTYPES)} or the torch dtype itself")
