"""The flash backends: ``flash_attention_2`` (flash-attn's CUDA kernels) and ``flash_reference`` (ours).

Both are one implementation, :func:`_flash_forward`, run with a different :class:`FlashKernels`: the
``flash_attn`` package's ``flash_attn_func`` / ``flash_attn_varlen_func``, or their pure-PyTorch
twins in :mod:`llama_port.attention.flash_reference`. So everything here (unpadding, packing, the
decode step) can be tested on a CPU, and the CUDA kernels checked against the reference on a GPU.

Contract (every backend): ``fn(module, query, key, value, mask, scaling, dropout) -> (out, None)``
with query (B, Hq, T, D), key/value (B, Hkv, S, D), S = cached + T (a static cache's whole length),
``mask`` a :class:`~llama_port.attention.masks.VarlenMask`, out (B, T, Hq, D). GQA reaches the
kernels as is (they take Hq a multiple of Hkv); K/V are never repeated.

Three paths, by the mask:

* ``packed_cu_seqlens`` (several documents per row, no cache): the (B * T) tokens are one ragged
  batch; ``flash_attn_varlen_func`` with those offsets for both queries and keys.
* no key padding: ``flash_attn_func(causal=True)``. With T < S (decode) flash-attn aligns the causal
  mask to the bottom-right, so the T queries are the last T keys: exactly the cache layout.
* key padding: unpad and call ``flash_attn_varlen_func``; see :func:`_query_columns` for where the
  queries sit among the keys. Outputs at padded query positions are 0, like transformers'.

Dtype policy:

* ``flash_attention_2``: the CUDA kernels compute only in fp16/bf16. fp16 and bf16 inputs run as they
  are; any other dtype (fp32) is cast to bfloat16 for the kernel, with a warning the first time, and
  the output is cast back to the input dtype. head_dim > 256 raises ValueError (the kernels' limit).
* ``flash_reference``: any floating dtype with no cast (the kernel accumulates in fp32 and returns the
  input dtype); no head_dim limit. It is inference-only: dropout > 0 raises ValueError.

Availability: :func:`check_flash_attention_2_available` raises :class:`FlashAttentionUnavailableError`
(an ``ImportError`` subclass, for a missing package and for a missing or too old GPU alike) and
:func:`flash_attn_is_usable` answers the same question with a bool, for auto-selection.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_port.attention import flash_reference
from llama_port.attention.masks import VarlenMask

FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"
FLASH_ATTN_MAX_HEAD_DIM = 256
FLASH_ATTN_MIN_VERSION = (2, 1)  # 2.0 aligned causal masks top-left, which breaks the decode step
FLASH_ATTN_MIN_CAPABILITY = (8, 0)  # FlashAttention-2 runs on Ampere and newer


@dataclass(frozen=True)
class FlashKernels:
    """The two flash_attn entry points a backend runs with, and what they accept.

    compute_dtypes: dtypes the kernels take; others are cast to the first one (None: any dtype).
    max_head_dim: the largest head_dim the kernels take (None: no limit).
    """

    name: str
    func: Callable[..., Tensor]  # flash_attn_func
    varlen_func: Callable[..., Tensor]  # flash_attn_varlen_func
    compute_dtypes: tuple[torch.dtype, ...] | None
    max_head_dim: int | None


REFERENCE_KERNELS = FlashKernels(
    name="flash_reference",
    func=flash_reference.flash_attn_func,
    varlen_func=flash_reference.flash_attn_varlen_func,
    compute_dtypes=None,
    max_head_dim=None,
)


def _flash_attn_kernels() -> FlashKernels:
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # optional dependency: STYLE rule 6

    return FlashKernels(
        name="flash_attention_2",
        func=flash_attn_func,
        varlen_func=flash_attn_varlen_func,
        compute_dtypes=(torch.bfloat16, torch.float16),
        max_head_dim=FLASH_ATTN_MAX_HEAD_DIM,
    )


def flash_attention_2_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: VarlenMask, scaling: float, dropout: float
) -> tuple[Tensor, None]:
    """Attention with flash-attn's CUDA kernels: (out (B, T, Hq, D), None). fp32 runs in bf16 (see module doc)."""
    return _flash_forward(_flash_attn_kernels(), module, query, key, value, mask, scaling, dropout)


def flash_reference_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: VarlenMask, scaling: float, dropout: float
) -> tuple[Tensor, None]:
    """Same as :func:`flash_attention_2_forward` with the PyTorch reference kernels, in any dtype."""
    return _flash_forward(REFERENCE_KERNELS, module, query, key, value, mask, scaling, dropout)


def _flash_forward(
    kernels: FlashKernels,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: VarlenMask,
    scaling: float,
    dropout: float,
) -> tuple[Tensor, None]:
    """The flash backend body, shared by both kernel sets: (out (B, T, Hq, D) in query's dtype, None)."""
    B, Hq, T, D = query.shape
    if kernels.max_head_dim is not None and D > kernels.max_head_dim:
        raise ValueError(
            f"{kernels.name} supports head_dim <= {kernels.max_head_dim}; got head_dim={D}. "
            "Use attn_implementation='sdpa' or 'flash_reference'."
        )
    input_dtype = query.dtype
    if kernels.compute_dtypes is not None and input_dtype not in kernels.compute_dtypes:
        # The CUDA kernels have no fp32 path: run them in bf16 and hand back the caller's dtype.
        target = kernels.compute_dtypes[0]
        _warn_once(
            f"{kernels.name} computes in fp16/bf16 only: casting {input_dtype} query/key/value to {target} "
            f"for the kernel and the output back to {input_dtype}."
        )
        query, key, value = query.to(target), key.to(target), value.to(target)

    # flash_attn wants (B, T, H, D): a transpose keeps the last dim contiguous, which is all it needs.
    q = query.transpose(1, 2)  # (B, T, Hq, D)
    k = key.transpose(1, 2)  # (B, S, Hkv, D)
    v = value.transpose(1, 2)  # (B, S, Hkv, D)
    causal = module.is_causal

    key_padding = mask.key_padding_mask
    if mask.packed_cu_seqlens is not None:
        out = _packed_forward(kernels, q, k, v, mask, scaling, dropout, causal)
    elif key_padding is None or (not torch.compiler.is_compiling() and bool(key_padding.all())):
        # Every key is real and the queries are the last T of them: bottom-right causal is exact.
        # (Traced, the key mask's values are not read: the unpadded path is exact for any mask.)
        out = kernels.func(q, k, v, dropout_p=dropout, softmax_scale=scaling, causal=causal)
    else:
        out = _unpadded_forward(kernels, q, k, v, key_padding, scaling, dropout, causal)
    return out.to(input_dtype), None


def _packed_forward(
    kernels: FlashKernels,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: VarlenMask,
    scaling: float,
    dropout: float,
    causal: bool,
) -> Tensor:
    """Documents packed into the rows: one varlen call over all B * T tokens. -> (B, T, Hq, D)."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if S != T:
        raise ValueError(
            f"packed sequences (packed_cu_seqlens) are only supported without a KV cache; got T={T} queries "
            f"and S={S} keys"
        )
    if mask.key_padding_mask is not None and not bool(mask.key_padding_mask.all()):
        raise ValueError("packed sequences (packed_cu_seqlens) cannot be combined with padding (key_padding_mask)")
    cu_seqlens = mask.packed_cu_seqlens
    max_seqlen = mask.packed_max_seqlen
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = kernels.varlen_func(
        q.reshape(B * T, Hq, D),  # (B*T, Hq, D)
        k.reshape(B * T, Hkv, D),  # (B*T, Hkv, D)
        v.reshape(B * T, Hkv, D),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=causal,
    )  # (B*T, Hq, D)
    return out.view(B, T, Hq, D)


def _query_columns(key_padding_mask: Tensor, T: int) -> Tensor:
    """The key column (B, T) each query of each row sits at.

    The T queries of a row are T consecutive key columns ending at the row's last real key, or at
    column T when that comes earlier (a right-padded prompt written from the start of the cache).
    That covers every layout the model makes: with a dynamic cache the last real key is the last
    column, so the queries are the last T columns (left-padded prefill, decode); with a static cache
    the unused trailing slots are skipped by ending at the last real key. The assumption: the newest
    query of a row is a real token, except in a right-padded prefill that starts the cache.
    """
    B, S = key_padding_mask.shape
    cols = torch.arange(S, device=key_padding_mask.device)
    last_real = torch.where(key_padding_mask, cols, -1).amax(dim=-1)  # (B,) -1 for a row with no real key
    end = torch.clamp(last_real + 1, min=T)  # (B,) one past the last query column
    return end[:, None] - T + torch.arange(T, device=key_padding_mask.device)  # (B, T)


def _unpadded_forward(
    kernels: FlashKernels,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    scaling: float,
    dropout: float,
    causal: bool,
) -> Tensor:
    """Padded rows: drop the pads, run varlen over the real tokens, scatter back. -> (B, T, Hq, D).

    Each row becomes one varlen sequence: its real keys (in order) and its real queries. The real
    queries are the row's last real keys (no real key comes after the query window), so flash-attn's
    bottom-right causal alignment puts each of them on its own key. Pad queries output 0.
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if key_padding_mask.shape != (B, S):
        raise ValueError(f"key_padding_mask must be (B, S) = ({B}, {S}); got {tuple(key_padding_mask.shape)}")
    if S < T:
        raise ValueError(f"got more queries (T={T}) than keys (S={S})")
    key_padding_mask = key_padding_mask.bool()
    query_real = key_padding_mask.gather(1, _query_columns(key_padding_mask, T))  # (B, T) True for a real query

    indices_k, cu_seqlens_k, max_seqlen_k = _unpad_indices(key_padding_mask)
    indices_q, cu_seqlens_q, max_seqlen_q = _unpad_indices(query_real)
    out = kernels.varlen_func(
        q.reshape(B * T, Hq, D)[indices_q],  # (total_q, Hq, D)
        k.reshape(B * S, Hkv, D)[indices_k],  # (total_k, Hkv, D)
        v.reshape(B * S, Hkv, D)[indices_k],
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=causal,
    )  # (total_q, Hq, D)
    padded = out.new_zeros(B * T, Hq, D)  # pad queries stay 0
    padded[indices_q] = out
    return padded.view(B, T, Hq, D)


def _unpad_indices(real: Tensor) -> tuple[Tensor, Tensor, int]:
    """For a (B, L) bool mask: flat indices of the real entries, cu_seqlens (B + 1,) int32, longest row."""
    seqlens = real.sum(dim=-1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()  # (total,)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (B + 1,)
    return indices, cu_seqlens, int(seqlens.max())


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


# --- availability ----------------------------------------------------------------------------------


class FlashAttentionUnavailableError(ImportError):
    """flash_attention_2 cannot run here: flash-attn is missing or too old, or there is no suitable GPU.

    An ImportError, so ``except ImportError`` around an optional backend catches every reason.
    """


def check_flash_attention_2_available(device: torch.device | None = None) -> None:
    """Raise FlashAttentionUnavailableError unless flash-attn >= 2.1 imports and CUDA can run it.

    device: where the model lives, when known. A CUDA device must be Ampere (sm80) or newer; a CPU
    device only warns, since a model is often built on the CPU and moved to the GPU afterwards.
    """
    try:
        import flash_attn  # optional dependency: STYLE rule 6
    except ImportError as error:
        raise FlashAttentionUnavailableError(
            f"attn_implementation='flash_attention_2' needs the flash-attn package ({error}). Install it with "
            f"`{FLASH_ATTN_INSTALL}` (CUDA, Ampere or newer GPU), or use 'sdpa' or 'flash_reference'."
        ) from error
    version = getattr(flash_attn, "__version__", "0")
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < FLASH_ATTN_MIN_VERSION:
        raise FlashAttentionUnavailableError(
            f"flash-attn {version} is too old; flash_attention_2 needs >= 2.1 (bottom-right causal masks): "
            f"`pip install -U flash-attn --no-build-isolation`"
        )
    if not torch.cuda.is_available():
        raise FlashAttentionUnavailableError(
            "attn_implementation='flash_attention_2' needs a CUDA GPU, but torch.cuda.is_available() is False. "
            "Use 'sdpa' or 'flash_reference' on this machine."
        )
    if device is None:
        return
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FLASH_ATTN_MIN_CAPABILITY:
            raise FlashAttentionUnavailableError(
                f"flash_attention_2 needs an Ampere (sm80) or newer GPU; {device} is sm{capability[0]}{capability[1]}. "
                "Use 'sdpa'."
            )
    elif device.type != "meta":
        warnings.warn(
            f"flash_attention_2 runs on CUDA only and the model is on {device}: move it to a GPU before running it.",
            stacklevel=2,
        )


def flash_attn_is_usable() -> bool:
    """True when flash_attention_2 can run on the current CUDA device (for auto-selecting a backend)."""
    try:
        check_flash_attention_2_available(torch.device("cuda") if torch.cuda.is_available() else None)
    except FlashAttentionUnavailableError:
        return False
    return True
