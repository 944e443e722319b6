"""FlashAttention-2 in plain PyTorch: the algorithm, written out, for CPUs and for checking the CUDA kernels.

The three public functions take the arguments of their ``flash_attn`` 2.x namesakes and give the same
results, so the flash backend (``attention/flash.py``) runs either with one piece of code:

* :func:`flash_attn_func`: q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D) -> (B, Tq, Hq, D).
* :func:`flash_attn_varlen_func`: N sequences packed along the first axis, delimited by cu_seqlens.
* :func:`flash_attn_with_kvcache`: writes new k/v into the cache in place, then attends to the cache.

All three are thin over :func:`_attention_blocks`, which is FlashAttention-2's forward pass (Dao, 2023,
Algorithm 1). For one block of query rows Q_i it streams the key/value blocks K_j, V_j and keeps, per
query row, a running max ``m``, a running sum ``l`` (``row_max``, ``row_sum`` in the code) and an
unnormalised output ``acc``::

    m = -inf, l = 0, acc = 0
    for each K_j, V_j that Q_i can see:
        S     = scale * Q_i @ K_j^T             # (block_q, block_k): the only scores ever held
        m_new = max(m, rowmax(S))
        P     = exp(S - m_new)                  # every exponent <= 0: no overflow
        alpha = exp(m - m_new)                  # the old max was too small: rescale what was summed
        l     = alpha * l + rowsum(P)
        acc   = alpha * acc + P @ V_j
        m     = m_new
    O_i = acc / l,   lse_i = m + log(l)

At every step ``acc / l`` is the softmax-weighted average over the keys seen so far, so the result is
exact softmax attention while memory stays O(T * D + block_q * block_k): the Tq x Tk score matrix is
never built. Key blocks entirely above the causal diagonal (or outside the sliding window) are not
visited at all; only blocks that straddle the boundary are masked.

Semantics, as in flash_attn:

* ``causal`` with Tq != Tk is aligned to the bottom-right corner: query i sits at key position
  i + Tk - Tq and attends keys j <= i + Tk - Tq (the decode step, Tq = 1, sees every key).
* ``window_size=(left, right)``: query i attends keys in [i + Tk - Tq - left, i + Tk - Tq + right];
  -1 means unbounded; ``causal`` sets right = 0.
* ``softcap > 0``: scores become softcap * tanh(scores / softcap) (after scaling, before the mask).
* ``alibi_slopes`` (Hq,) or (B, Hq): adds -slope * |i + Tk - Tq - j| to the scaled scores.
* A query row that can see no key outputs 0 (and its lse is +inf).
* ``softmax_scale`` defaults to 1 / sqrt(D). GQA/MQA (Hq a multiple of Hkv) is handled by viewing
  the Hq query heads as (Hkv, G) groups; K/V are never repeated.
* Any floating dtype (fp32 included): the arithmetic is fp32 (fp64 for fp64 inputs) and the output
  has the input's dtype.

This is an inference kernel: ``dropout_p > 0`` raises ValueError, and nothing here is written for
autograd efficiency. Other flash_attn arguments (rotary, paged caches, ...) are accepted only at
their default value; anything else raises ValueError rather than being silently ignored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Tile sizes (rows of Q, rows of K/V per step). The CUDA kernel picks 64-128 from head_dim and the
# GPU's shared memory; on a CPU they only trade python-loop overhead against tile size.
BLOCK_Q = 128
BLOCK_K = 64


def _attention_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 forward for B sequences of equal lengths (see the module docstring).

    q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D), alibi_slopes (B, Hq) fp32 or None. Returns the output
    (B, Tq, Hq, D) in q's dtype and the log-sum-exp of the scores (B, Hq, Tq) in fp32 (fp64 for
    fp64 inputs).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv  # query heads per K/V head
    offset = Tk - Tq  # bottom-right alignment: query i sits at key position i + offset
    left, right = window_size
    if causal:
        right = 0

    # Working copies in fp32 (fp64 stays fp64), heads first. GQA: query head h = kv_head * G + g,
    # so the Hq axis views as (Hkv, G) and the G rows of one K/V head share its tiles: no repeat_kv.
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc_dtype).view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, D)
    kf = k.to(acc_dtype).transpose(1, 2)  # (B, Hkv, Tk, D)
    vf = v.to(acc_dtype).transpose(1, 2)  # (B, Hkv, Tk, D)
    slopes = None if alibi_slopes is None else alibi_slopes.to(acc_dtype).reshape(B, Hkv, G, 1, 1)
    on = {"dtype": acc_dtype, "device": q.device}

    out = torch.zeros(B, Hkv, G, Tq, D, **on)
    lse = torch.full((B, Hkv, G, Tq), math.inf, **on)

    for i0 in range(0, Tq, block_q):  # outer loop: one query block at a time
        i1 = min(i0 + block_q, Tq)
        bq = i1 - i0
        q_blk = qf[:, :, :, i0:i1].reshape(B, Hkv, G * bq, D)  # (B, Hkv, G*bq, D)
        q_pos = torch.arange(i0, i1, device=q.device) + offset  # (bq,) key position of each query

        # Keys this block can see at all: [lo, hi). Blocks outside are skipped, not masked.
        lo = 0 if left < 0 else max(0, i0 + offset - left)
        hi = Tk if right < 0 else min(Tk, i1 + offset + right)

        row_max = torch.full((B, Hkv, G, bq), -math.inf, **on)  # m
        row_sum = torch.zeros(B, Hkv, G, bq, **on)  # l: sum of exp(S - m)
        acc = torch.zeros(B, Hkv, G, bq, D, **on)  # running unnormalised output

        # Inner loop: K/V blocks on the block_k grid (as the CUDA kernel walks them), from the
        # first one holding a visible key to the last.
        for j0 in range(lo - lo % block_k, hi, block_k):
            j1 = min(j0 + block_k, Tk)
            k_blk, v_blk = kf[:, :, j0:j1], vf[:, :, j0:j1]  # (B, Hkv, bk, D)

            # S = scale * Q K^T for this tile only.
            s = (q_blk @ k_blk.transpose(-1, -2)).view(B, Hkv, G, bq, j1 - j0) * scale  # (B, Hkv, G, bq, bk)
            if softcap > 0.0:
                s = softcap * torch.tanh(s / softcap)
            rel = torch.arange(j0, j1, device=q.device)[None, :] - q_pos[:, None]  # (bq, bk) key - query position
            if slopes is not None:
                s = s - slopes * rel.abs()
            # Only tiles that cross the diagonal or a window edge need a mask.
            crosses_right = right >= 0 and j1 - 1 > i0 + offset + right
            crosses_left = left >= 0 and j0 < i1 - 1 + offset - left
            if crosses_right or crosses_left:
                visible = torch.ones_like(rel, dtype=torch.bool)
                if right >= 0:
                    visible &= rel <= right
                if left >= 0:
                    visible &= rel >= -left
                s = s.masked_fill(~visible, -math.inf)

            # Online softmax. A row that has seen no visible key yet has m_new = -inf; shift it by 0
            # instead, so that exp(-inf - 0) = 0 rather than exp(-inf + inf) = nan.
            m_new = torch.maximum(row_max, s.amax(dim=-1))  # (B, Hkv, G, bq)
            shift = torch.where(m_new == -math.inf, 0.0, m_new)
            p = torch.exp(s - shift[..., None])  # (B, Hkv, G, bq, bk)
            alpha = torch.exp(row_max - shift)  # (B, Hkv, G, bq) rescales what was summed under the old max
            row_sum = alpha * row_sum + p.sum(dim=-1)
            pv = p.view(B, Hkv, G * bq, j1 - j0) @ v_blk  # (B, Hkv, G*bq, D)
            acc = alpha[..., None] * acc + pv.view(B, Hkv, G, bq, D)
            row_max = m_new

        # Normalise once at the end; a row with l = 0 saw no key: output 0, lse +inf (as flash_attn).
        seen = row_sum > 0
        out[:, :, :, i0:i1] = acc / torch.where(seen, row_sum, 1.0)[..., None]
        lse[:, :, :, i0:i1] = torch.where(seen, row_max + torch.log(row_sum), math.inf)

    out = out.permute(0, 3, 1, 2, 4).reshape(B, Tq, Hq, D)  # (B, Tq, Hq, D)
    return out.to(q.dtype), lse.view(B, Hq, Tq)


# --- argument checks shared by the public functions ---------------------------------------------


def _check_defaults(fn: str, **given: object) -> None:
    """flash_attn arguments the reference does not implement: accepted only at their default value."""
    defaults = {
        "rotary_cos": None,
        "rotary_sin": None,
        "cache_batch_idx": None,
        "cache_leftpad": None,
        "block_table": None,
        "rotary_interleaved": True,
    }
    for name, value in given.items():
        if value is not defaults[name]:
            raise ValueError(
                f"{fn}: {name}={value!r} is not supported by the reference kernel; "
                f"only the default {defaults[name]!r} is accepted"
            )


def _check_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p={dropout_p}: the reference FlashAttention kernel is inference-only; "
            "use dropout_p=0.0 (or the flash_attention_2 / eager backend for training with dropout)"
        )


def _check_heads(q: Tensor, k: Tensor, v: Tensor) -> None:
    hq, hkv = q.shape[-2], k.shape[-2]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim; got {q.shape[-1]} and {k.shape[-1]}")
    if hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def _check_blocks(block_q: int, block_k: int) -> None:
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be >= 1; got {block_q} and {block_k}")


def _alibi(alibi_slopes: Tensor | None, batch: int, hq: int) -> Tensor | None:
    """alibi_slopes (Hq,) or (batch, Hq) as (batch, Hq), or None."""
    if alibi_slopes is None:
        return None
    if alibi_slopes.shape == (hq,):
        return alibi_slopes.expand(batch, hq)
    if alibi_slopes.shape == (batch, hq):
        return alibi_slopes
    raise ValueError(f"alibi_slopes must have shape ({hq},) or ({batch}, {hq}); got {tuple(alibi_slopes.shape)}")


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale


# --- the flash_attn API ----------------------------------------------------------------------------


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    # flash_attn's further options, in its order:
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """Attention of q (B, Tq, Hq, D) over k/v (B, Tk, Hkv, D) -> (B, Tq, Hq, D), as flash_attn's.

    With return_attn_probs=True returns (out, softmax_lse (B, Hq, Tq) fp32, None): flash_attn only
    returns probabilities with dropout, which this kernel does not do. ``deterministic`` concerns the
    backward pass only and is accepted for signature compatibility.
    """
    _check_dropout(dropout_p)
    _check_blocks(block_q, block_k)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"expected q (B, Tq, Hq, D) and k/v (B, Tk, Hkv, D); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    _check_heads(q, k, v)
    slopes = _alibi(alibi_slopes, q.shape[0], q.shape[2])
    scale = _scale(softmax_scale, q.shape[-1])
    out, lse = _attention_blocks(q, k, v, scale, causal, tuple(window_size), softcap, slopes, block_q, block_k)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    # flash_attn's further options, in its order:
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False,
    block_table: Tensor | None = None,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """Attention for N sequences packed along the first axis, as flash_attn's.

    q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence n owns rows cu_seqlens_q[n]:cu_seqlens_q[n+1]
    of q and cu_seqlens_k[n]:cu_seqlens_k[n+1] of k/v (int32 (N+1,) offsets) and attends only to its
    own keys; causal alignment is bottom-right per sequence. Returns (total_q, Hq, D), or with
    return_attn_probs=True (out, softmax_lse (Hq, total_q) fp32, None). Sequences run one at a time.
    """
    _check_dropout(dropout_p)
    _check_defaults("flash_attn_varlen_func", block_table=block_table)
    _check_blocks(block_q, block_k)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"expected q (total_q, Hq, D) and k/v (total_k, Hkv, D); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    _check_heads(q, k, v)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor (N + 1,); got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must both be (N + 1,); got {tuple(cu_seqlens_q.shape)} "
            f"and {tuple(cu_seqlens_k.shape)}"
        )
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if starts_q[-1] != q.shape[0] or starts_k[-1] != k.shape[0]:
        raise ValueError(
            f"cu_seqlens end at {starts_q[-1]} (q) and {starts_k[-1]} (k) but q has {q.shape[0]} rows "
            f"and k {k.shape[0]}"
        )

    Hq = q.shape[1]
    slopes = _alibi(alibi_slopes, len(starts_q) - 1, Hq)
    scale = _scale(softmax_scale, q.shape[-1])
    out = torch.zeros_like(q)  # (total_q, Hq, D)
    lse = torch.full((Hq, q.shape[0]), math.inf, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for n in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[n], starts_q[n + 1], starts_k[n], starts_k[n + 1]
        if q1 - q0 > max_seqlen_q or k1 - k0 > max_seqlen_k:
            raise ValueError(
                f"sequence {n} has {q1 - q0} queries and {k1 - k0} keys, more than "
                f"max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k}"
            )
        if q1 == q0:
            continue
        slopes_n = None if slopes is None else slopes[n : n + 1]
        q_n, k_n, v_n = q[None, q0:q1], k[None, k0:k1], v[None, k0:k1]  # (1, T_n, H, D)
        out_n, lse_n = _attention_blocks(
            q_n, k_n, v_n, scale, causal, tuple(window_size), softcap, slopes_n, block_q, block_k
        )  # (1, Tq_n, Hq, D), (1, Hq, Tq_n)
        out[q0:q1] = out_n[0]
        lse[:, q0:q1] = lse_n[0]
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode-style attention against a preallocated cache, as flash_attn's.

    q (B, Tq, Hq, D); k_cache/v_cache (B, S_max, Hkv, D); k/v (B, T_new, Hkv, D) or None;
    cache_seqlens int or (B,) int32: how many cache slots of each row are filled. When k/v are
    given they are written IN PLACE into the cache at [cache_seqlens, cache_seqlens + T_new) and
    row b attends to cache[b, :cache_seqlens[b] + T_new]; without k/v, to cache[b, :cache_seqlens[b]];
    without cache_seqlens, to the whole cache (k/v then must be None). Causal alignment is
    bottom-right against each row's key count. Returns (B, Tq, Hq, D), or (out, softmax_lse
    (B, Hq, Tq)) with return_softmax_lse=True. ``num_splits`` is a CUDA scheduling knob: ignored.
    """
    _check_defaults(
        "flash_attn_with_kvcache",
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        rotary_interleaved=rotary_interleaved,
    )
    _check_blocks(block_q, block_k)
    if q.dim() != 4 or k_cache.dim() != 4 or q.shape[0] != k_cache.shape[0]:
        raise ValueError(
            f"expected q (B, Tq, Hq, D) and k_cache/v_cache (B, S_max, Hkv, D); got {tuple(q.shape)} "
            f"and {tuple(k_cache.shape)}"
        )
    _check_heads(q, k_cache, v_cache)
    B, S_max = k_cache.shape[0], k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    t_new = 0 if k is None else k.shape[1]
    if k is not None and (k.shape != v.shape or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:]):
        raise ValueError(f"k/v must be (B, T_new, Hkv, D) matching the cache; got {tuple(k.shape)}")

    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_with_kvcache: new k/v need cache_seqlens to know where to write them")
        filled = [S_max] * B
    elif isinstance(cache_seqlens, int):
        filled = [cache_seqlens] * B
    else:
        if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
            raise ValueError(
                f"cache_seqlens must be an int or an int32 tensor ({B},); "
                f"got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}"
            )
        filled = cache_seqlens.tolist()
    if any(n < 0 or n + t_new > S_max for n in filled):
        raise ValueError(f"cache_seqlens {filled} + {t_new} new tokens do not fit a cache of {S_max} slots")

    slopes = _alibi(alibi_slopes, B, q.shape[2])
    scale = _scale(softmax_scale, q.shape[-1])
    outs, lses = [], []
    for b, n in enumerate(filled):  # rows may hold different lengths: one row at a time
        if k is not None:
            k_cache[b, n : n + t_new] = k[b]  # in place, like the CUDA kernel
            v_cache[b, n : n + t_new] = v[b]
        slopes_b = None if slopes is None else slopes[b : b + 1]
        k_b, v_b = k_cache[b : b + 1, : n + t_new], v_cache[b : b + 1, : n + t_new]  # (1, n + T_new, Hkv, D)
        out_b, lse_b = _attention_blocks(
            q[b : b + 1], k_b, v_b, scale, causal, tuple(window_size), softcap, slopes_b, block_q, block_k
        )  # (1, Tq, Hq, D), (1, Hq, Tq)
        outs.append(out_b)
        lses.append(lse_b)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_softmax_lse else out
