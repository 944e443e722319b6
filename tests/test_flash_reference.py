"""The PyTorch FlashAttention-2 (attention/flash_reference.py) and the flash backend (attention/flash.py).

Everything is checked against a naive attention written here (fp32 matmul, explicit mask, softmax).
Run with -s to see the largest differences. Tests marked ``gpu`` compare the real flash-attn CUDA
kernels with the reference and skip without flash_attn or CUDA.
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

from llama_port.attention import flash
from llama_port.attention.flash_reference import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from llama_port.attention.masks import VarlenMask

FP32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 inputs and output (8 mantissa bits) against fp32 attention of the fp32 inputs

# Small tiles so that short sequences still span several blocks, with ragged last blocks.
SMALL_BLOCKS = {"block_q": 16, "block_k": 8}

_LARGEST: dict[str, float] = {}


def _record(kind: str, diff: float) -> float:
    _LARGEST[kind] = max(_LARGEST.get(kind, 0.0), diff)
    return diff


@pytest.fixture(scope="module", autouse=True)
def _report_largest_diffs():
    yield
    lines = [f"  {kind:<36} {diff:.3e}" for kind, diff in sorted(_LARGEST.items())]
    print("\nlargest max|diff| per check:\n" + "\n".join(lines))


# --- naive attention ---------------------------------------------------------------------------


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D) -> out (B, Tq, Hq, D) and lse (B, Hq, Tq).

    Full Tq x Tk scores, matmuls in ``dtype`` (softmax in at least fp32); causal aligned bottom-right; rows
    that see no key give 0 (lse inf).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.to(dtype).repeat_interleave(Hq // Hkv, dim=2)  # (B, Tk, Hq, D)
    v = v.to(dtype).repeat_interleave(Hq // Hkv, dim=2)
    softmax_dtype = torch.promote_types(dtype, torch.float32)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k).to(softmax_dtype) * scale  # (B, Hq, Tq, Tk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos_k, pos_q = torch.arange(Tk, device=q.device), torch.arange(Tq, device=q.device) + Tk - Tq
    rel = pos_k[None, :] - pos_q[:, None]  # (Tq, Tk) key position - query position
    if alibi_slopes is not None:
        s = s - alibi_slopes.float().view(-1, Hq, 1, 1) * rel.abs()
    left, right = window_size
    right = 0 if causal else right
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if right >= 0:
        allowed &= rel <= right
    if left >= 0:
        allowed &= rel >= -left
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty rows: nan -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dtype), v)
    return out, torch.where(lse == float("-inf"), float("inf"), lse)


def naive_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float):
    """In the backend contract's shapes: q (B, Hq, T, D), k/v (B, Hkv, S, D), allowed (B, T, S).

    -> (B, T, Hq, D) fp32; rows with no allowed key give 0.
    """
    G = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(G, dim=1)  # (B, Hq, S, D)
    v = v.float().repeat_interleave(G, dim=1)
    s = (q.float() @ k.transpose(-1, -2)) * scale  # (B, Hq, T, S)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)  # (B, T, Hq, D)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --- flash_attn_func ---------------------------------------------------------------------------

SHAPES = [  # (B, Tq, Tk, causal)
    (2, 37, 37, True),
    (2, 37, 37, False),
    (1, 19, 83, True),  # Tq < Tk: bottom-right causal
    (3, 1, 45, True),  # decode step
    (1, 50, 20, True),  # Tq > Tk: the first 30 queries see no key -> 0
    (1, 23, 61, False),
]
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("b,tq,tk,causal", SHAPES)
def test_flash_attn_func_matches_naive(b, tq, tk, causal, hq, hkv, head_dim):
    torch.manual_seed(tq * 1000 + tk)
    q = torch.randn(b, tq, hq, head_dim)
    k = torch.randn(b, tk, hkv, head_dim)
    v = torch.randn(b, tk, hkv, head_dim)
    out = flash_attn_func(q, k, v, causal=causal, **SMALL_BLOCKS)
    expected, _ = naive_attention(q, k, v, causal)
    diff = _record("fp32 flash_attn_func", _max_diff(out, expected))
    print(f"flash_attn_func B={b} Tq={tq} Tk={tk} causal={causal} H={hq}/{hkv} D={head_dim}: {diff:.2e}")
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert diff <= FP32_TOL
    if tq > tk and causal:
        assert torch.all(out[:, : tq - tk] == 0)


def test_default_blocks_and_scale():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 300, 4, 64), torch.randn(2, 300, 2, 64), torch.randn(2, 300, 2, 64)
    out = flash_attn_func(q, k, v, softmax_scale=0.2, causal=True)  # BLOCK_Q x BLOCK_K tiles
    expected, _ = naive_attention(q, k, v, causal=True, scale=0.2)
    assert _record("fp32 flash_attn_func", _max_diff(out, expected)) <= FP32_TOL


def test_fp64_stays_fp64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 33, 2, 16, dtype=torch.float64) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True, **SMALL_BLOCKS)
    expected, _ = naive_attention(q, k, v, causal=True, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert _record("fp64 flash_attn_func", _max_diff(out, expected)) <= 1e-12


@pytest.mark.parametrize(
    "causal,window_size,softcap,alibi",
    [
        (True, (8, -1), 0.0, False),  # sliding window
        (False, (5, 3), 0.0, False),
        (True, (-1, -1), 5.0, False),  # softcap
        (True, (-1, -1), 0.0, True),  # ALiBi
        (False, (6, 6), 2.0, True),
    ],
)
def test_window_softcap_alibi(causal, window_size, softcap, alibi):
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 29, 4, 32), torch.randn(2, 41, 2, 32), torch.randn(2, 41, 2, 32)
    slopes = torch.rand(2, 4) if alibi else None
    out = flash_attn_func(
        q, k, v, causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=slopes, **SMALL_BLOCKS
    )
    expected, _ = naive_attention(q, k, v, causal, window_size=window_size, softcap=softcap, alibi_slopes=slopes)
    assert _record("fp32 window/softcap/alibi", _max_diff(out, expected)) <= FP32_TOL


def test_return_attn_probs_gives_lse():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 40, 4, 32), torch.randn(1, 25, 2, 32), torch.randn(1, 25, 2, 32)
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, **SMALL_BLOCKS)
    expected, expected_lse = naive_attention(q, k, v, causal=True)
    assert probs is None and lse.shape == (1, 4, 40)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))  # the 15 queries that see no key
    finite = torch.isfinite(expected_lse)
    assert _max_diff(lse[finite], expected_lse[finite]) <= FP32_TOL
    assert _max_diff(out, expected) <= FP32_TOL


def test_bf16_close_to_fp32():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 45, 4, 64), torch.randn(2, 70, 2, 64), torch.randn(2, 70, 2, 64)
    out = flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, **SMALL_BLOCKS)
    expected, _ = naive_attention(q, k, v, causal=True)  # fp32 inputs, fp32 math
    diff = _record("bf16 vs fp32 naive", _max_diff(out, expected))
    print(f"bf16 flash_attn_func vs fp32 naive: {diff:.2e}")
    assert out.dtype == torch.bfloat16
    assert diff <= BF16_TOL


@pytest.mark.parametrize(
    "kwargs", [{"dropout_p": 0.1}, {"alibi_slopes": torch.ones(3)}], ids=["dropout", "bad-alibi-shape"]
)
def test_flash_attn_func_rejects(kwargs):
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError):
        flash_attn_func(q, q, q, **kwargs)


def test_rejects_heads_not_multiple():
    with pytest.raises(ValueError, match="multiple"):
        flash_attn_func(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))


# --- flash_attn_varlen_func ----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_varlen_matches_each_sequence_alone(causal, hq, hkv):
    torch.manual_seed(4)
    lens_q, lens_k = [5, 33, 1, 17, 0], [5, 40, 9, 17, 3]  # incl. q_len < k_len and an empty query set
    D = 64
    seqs = [
        (torch.randn(tq, hq, D), torch.randn(tk, hkv, D), torch.randn(tk, hkv, D))
        for tq, tk in zip(lens_q, lens_k, strict=True)
    ]
    q, k, v = (torch.cat([s[i] for s in seqs]) for i in range(3))
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_attn_probs=True, **SMALL_BLOCKS
    )
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    for n, (qn, kn, vn) in enumerate(seqs):
        expected, expected_lse = naive_attention(qn[None], kn[None], vn[None], causal)
        got = out[cu_q[n] : cu_q[n + 1]]
        diff = _record("fp32 varlen", _max_diff(got, expected[0]))
        assert diff <= FP32_TOL, f"sequence {n}: {diff}"
        assert _max_diff(lse[:, cu_q[n] : cu_q[n + 1]], expected_lse[0]) <= FP32_TOL


def test_varlen_rejects_bad_cu_seqlens():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4)
    cu = cu.int()
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attn_varlen_func(q, q, q, cu, cu, 3, 4)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, block_table=torch.zeros(2, 1, dtype=torch.int32))


# --- flash_attn_with_kvcache ---------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_with_kvcache_writes_in_place_and_attends(hq, hkv):
    torch.manual_seed(5)
    B, S_max, T_new, D = 3, 48, 4, 64
    k_cache, v_cache = torch.randn(B, S_max, hkv, D), torch.randn(B, S_max, hkv, D)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    cache_seqlens = torch.tensor([0, 10, 30], dtype=torch.int32)
    q, k, v = torch.randn(B, T_new, hq, D), torch.randn(B, T_new, hkv, D), torch.randn(B, T_new, hkv, D)

    out = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True, **SMALL_BLOCKS
    )  # (B, T_new, Hq, D)

    for b, n in enumerate(cache_seqlens.tolist()):
        end = n + T_new
        assert torch.equal(k_cache[b, n:end], k[b]) and torch.equal(v_cache[b, n:end], v[b])  # written in place
        assert torch.equal(k_cache[b, :n], k_before[b, :n]) and torch.equal(k_cache[b, end:], k_before[b, end:])
        assert torch.equal(v_cache[b, :n], v_before[b, :n]) and torch.equal(v_cache[b, end:], v_before[b, end:])
        expected, _ = naive_attention(q[b : b + 1], k_cache[b : b + 1, :end], v_cache[b : b + 1, :end], True)
        assert _record("fp32 with_kvcache", _max_diff(out[b], expected[0])) <= FP32_TOL


def test_with_kvcache_without_new_keys():
    torch.manual_seed(6)
    k_cache, v_cache = torch.randn(2, 20, 2, 32), torch.randn(2, 20, 2, 32)
    q = torch.randn(2, 1, 4, 32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=13, causal=True, **SMALL_BLOCKS)
    expected, _ = naive_attention(q, k_cache[:, :13], v_cache[:, :13], True)
    assert _record("fp32 with_kvcache", _max_diff(out, expected)) <= FP32_TOL
    whole = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)  # no cache_seqlens: the whole cache
    expected, _ = naive_attention(q, k_cache, v_cache, True)
    assert _max_diff(whole, expected) <= FP32_TOL


def test_with_kvcache_rejects_overflow_and_rotary():
    k_cache = torch.zeros(1, 8, 1, 8)
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="fit"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k, cache_seqlens=6)
    with pytest.raises(ValueError, match="rotary_cos"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), rotary_cos=torch.ones(8, 4), cache_seqlens=2)


# --- memory --------------------------------------------------------------------------------------


def _peak_cpu_bytes(fn, *args) -> int:
    """Peak bytes allocated by the CPU allocator while fn(*args) runs.

    torch's CPU allocations are invisible to tracemalloc; torch.profiler with profile_memory=True
    records every allocation and free ("[memory]" events with a signed byte count). Their running
    sum in time order is the live memory; its maximum, the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_memory_grows_linearly():
    def naive(q, k, v):
        return naive_attention(q, k, v, causal=True)[0]

    def inputs(t):
        return torch.randn(1, t, 4, 64), torch.randn(1, t, 4, 64), torch.randn(1, t, 4, 64)

    T = 256
    flash_peaks = [_peak_cpu_bytes(lambda *a: flash_attn_func(*a, causal=True), *inputs(t)) for t in (T, 4 * T)]
    naive_peaks = [_peak_cpu_bytes(naive, *inputs(t)) for t in (T, 4 * T)]
    flash_ratio, naive_ratio = flash_peaks[1] / flash_peaks[0], naive_peaks[1] / naive_peaks[0]
    print(
        f"peak CPU memory T={T} -> {4 * T}: flash {flash_peaks[0]} -> {flash_peaks[1]} bytes (x{flash_ratio:.2f}), "
        f"naive {naive_peaks[0]} -> {naive_peaks[1]} bytes (x{naive_ratio:.2f})"
    )
    assert naive_ratio > 10  # the measurement does see the T x T score matrix
    assert flash_ratio < 6  # linear in T (plus constant tiles), not quadratic
    assert flash_peaks[1] < naive_peaks[1] / 4


# --- the flash backend adapter ---------------------------------------------------------------------


def _module(head_dim: int, groups: int) -> types.SimpleNamespace:
    """Stands in for LlamaAttention: the attributes the backends read."""
    return types.SimpleNamespace(
        layer_idx=0, head_dim=head_dim, num_key_value_groups=groups, is_causal=True, training=False
    )


def _qkv(B: int, hq: int, hkv: int, T: int, S: int, D: int = 32):
    return torch.randn(B, hq, T, D), torch.randn(B, hkv, S, D), torch.randn(B, hkv, S, D)  # (B, H, T, D)


def _allowed(key_padding_mask: torch.Tensor, query_cols: torch.Tensor) -> torch.Tensor:
    """(B, T, S): query t of row b (at key column query_cols[b, t]) may attend real keys at or before it."""
    S = key_padding_mask.shape[1]
    causal = torch.arange(S)[None, None, :] <= query_cols[:, :, None]  # (B, T, S)
    return causal & key_padding_mask[:, None, :]


def _check_adapter(query, key, value, kpm, query_cols, kind: str):
    D = query.shape[-1]
    scale = D**-0.5
    module = _module(D, query.shape[1] // key.shape[1])
    out, weights = flash.flash_reference_forward(module, query, key, value, VarlenMask(kpm), scale, 0.0)
    expected = naive_masked(query, key, value, _allowed(kpm, query_cols), scale)
    query_real = kpm.gather(1, query_cols)  # (B, T)
    assert weights is None and out.shape == expected.shape and out.dtype == query.dtype
    assert torch.all(out[~query_real] == 0)  # pads output exactly 0
    diff = _record("fp32 adapter", _max_diff(out[query_real], expected[query_real]))
    print(f"flash_reference_forward {kind}: {diff:.2e}")
    assert diff <= FP32_TOL


def test_adapter_left_padded_prefill():
    torch.manual_seed(7)
    B, T = 3, 12
    query, key, value = _qkv(B, 4, 2, T, T)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :3] = False
    kpm[2, :11] = False  # one real token
    _check_adapter(query, key, value, kpm, torch.arange(T).expand(B, T), "left-padded prefill")


def test_adapter_right_padded_prefill():
    torch.manual_seed(8)
    B, T = 2, 9
    query, key, value = _qkv(B, 4, 4, T, T)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[0, 5:] = False
    _check_adapter(query, key, value, kpm, torch.arange(T).expand(B, T), "right-padded prefill")


def test_adapter_decode_with_padding():
    torch.manual_seed(9)
    B, T, S = 3, 1, 10
    query, key, value = _qkv(B, 4, 1, T, S)
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[0, :4] = False
    kpm[2, :1] = False
    _check_adapter(query, key, value, kpm, torch.full((B, T), S - 1), "decode T=1 S=10")


@pytest.mark.parametrize("T,used", [(10, 10), (1, 11), (3, 13)], ids=["prefill", "decode", "chunk"])
def test_adapter_static_cache_trailing_slots(T, used):
    torch.manual_seed(10)
    B, S = 3, 16  # S: the whole preallocated cache
    query, key, value = _qkv(B, 4, 2, T, S)
    key[:, :, used:] = 1e3  # unused slots hold garbage: they must not be attended to
    value[:, :, used:] = 1e3
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[:, :used] = True
    kpm[1, :2] = False  # left padding in the prompt
    kpm[2, :5] = False
    query_cols = (used - T + torch.arange(T)).expand(B, T)
    _check_adapter(query, key, value, kpm, query_cols, f"static cache T={T} used={used} S={S}")


def test_adapter_no_padding_fast_path_and_decode():
    torch.manual_seed(11)
    B, T, S = 2, 3, 11
    query, key, value = _qkv(B, 4, 2, T, S)
    all_real = torch.ones(B, S, dtype=torch.bool)
    expected = naive_masked(query, key, value, _allowed(all_real, (S - T + torch.arange(T)).expand(B, T)), 0.3)
    for mask in (VarlenMask(), VarlenMask(key_padding_mask=all_real)):
        out, _ = flash.flash_reference_forward(_module(32, 2), query, key, value, mask, 0.3, 0.0)
        assert _record("fp32 adapter", _max_diff(out, expected)) <= FP32_TOL


def test_adapter_packed_documents_equal_each_alone():
    torch.manual_seed(12)
    B, T, hq, hkv, D = 2, 16, 4, 2, 32
    query, key, value = _qkv(B, hq, hkv, T, T, D)
    cu = torch.tensor([0, 5, 16, 21, 32], dtype=torch.int32)  # 4 documents in the flattened B*T tokens
    mask = VarlenMask(packed_cu_seqlens=cu, packed_max_seqlen=11)
    out, _ = flash.flash_reference_forward(_module(D, hq // hkv), query, key, value, mask, D**-0.5, 0.0)
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (query, key, value))  # (B*T, H, D)
    got = out.reshape(B * T, hq, D)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone, _ = naive_attention(q[None, start:end], k[None, start:end], v[None, start:end], causal=True)
        assert _record("fp32 adapter packed", _max_diff(got[start:end], alone[0])) <= FP32_TOL


def test_adapter_packed_rejects_cache():
    query, key, value = _qkv(1, 2, 2, 4, 8)
    mask = VarlenMask(packed_cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), packed_max_seqlen=4)
    with pytest.raises(ValueError, match="cache"):
        flash.flash_reference_forward(_module(32, 1), query, key, value, mask, 0.1, 0.0)


def test_reference_adapter_keeps_dtype_and_rejects_dropout():
    torch.manual_seed(13)
    query, key, value = (x.bfloat16() for x in _qkv(1, 4, 2, 5, 5))
    out, _ = flash.flash_reference_forward(_module(32, 2), query, key, value, VarlenMask(), 0.2, 0.0)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="inference-only"):
        flash.flash_reference_forward(_module(32, 2), query, key, value, VarlenMask(), 0.2, 0.1)


# A stand-in for the CUDA kernel set: flash_attention_2's dtype and head_dim policy, reference math.
_FA2_POLICY_ON_REFERENCE = flash.FlashKernels(
    name="flash_attention_2",
    func=flash.REFERENCE_KERNELS.func,
    varlen_func=flash.REFERENCE_KERNELS.varlen_func,
    compute_dtypes=(torch.bfloat16, torch.float16),
    max_head_dim=256,
)


def test_fa2_policy_casts_fp32_to_bf16_and_back_with_one_warning():
    torch.manual_seed(14)
    query, key, value = _qkv(2, 4, 2, 6, 6)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[0, :2] = False
    mask = VarlenMask(kpm)
    flash._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = flash._flash_forward(_FA2_POLICY_ON_REFERENCE, _module(32, 2), query, key, value, mask, 0.2, 0.0)
        flash._flash_forward(_FA2_POLICY_ON_REFERENCE, _module(32, 2), query, key, value, mask, 0.2, 0.0)
    assert len([w for w in caught if "bfloat16" in str(w.message)]) == 1
    reference, _ = flash.flash_reference_forward(_module(32, 2), query, key, value, mask, 0.2, 0.0)
    assert out.dtype == torch.float32
    assert _record("fp32->bf16 cast policy", _max_diff(out, reference)) <= BF16_TOL


def test_fa2_policy_rejects_head_dim_over_256():
    query, key, value = _qkv(1, 2, 2, 3, 3, D=288)
    query, key, value = query.half(), key.half(), value.half()
    with pytest.raises(ValueError, match="head_dim"):
        flash._flash_forward(_FA2_POLICY_ON_REFERENCE, _module(288, 1), query, key, value, VarlenMask(), 0.1, 0.0)


def test_availability_without_flash_attn():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash_attn is installed")
    assert flash.flash_attn_is_usable() is False
    with pytest.raises(ImportError, match="pip install flash-attn --no-build-isolation"):
        flash.check_flash_attention_2_available(None)
    query, key, value = _qkv(1, 2, 2, 3, 3)
    with pytest.raises(ImportError):
        flash.flash_attention_2_forward(_module(32, 1), query, key, value, VarlenMask(), 0.1, 0.0)


# --- the real kernels (GPU) ----------------------------------------------------------------------


def _require_flash_attn_cuda():
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if not flash.flash_attn_is_usable():
        pytest.skip("flash_attn cannot run on this GPU")


def _check_bf16_kernel(real: torch.Tensor, exact: torch.Tensor, torch_bf16: torch.Tensor, kind: str) -> None:
    """flash-attn's own test criterion: its error against fp32 attention of the same bf16 inputs is
    at most twice that of plain PyTorch attention computed in bf16 (plus a small floor)."""
    real_err, torch_err = _max_diff(real, exact), _max_diff(torch_bf16, exact)
    _record(f"gpu bf16 {kind}", real_err)
    print(f"{kind}: flash-attn {real_err:.2e}, torch bf16 {torch_err:.2e}")
    assert real_err <= 2 * torch_err + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("b,tq,tk,causal", SHAPES)
def test_gpu_flash_attn_func_matches_reference(b, tq, tk, causal, hq, hkv):
    _require_flash_attn_cuda()
    import flash_attn

    torch.manual_seed(20)
    q = torch.randn(b, tq, hq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, tk, hkv, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, tk, hkv, 128, device="cuda", dtype=torch.bfloat16)
    real = flash_attn.flash_attn_func(q, k, v, causal=causal)
    exact = flash_attn_func(q.float(), k.float(), v.float(), causal=causal)  # the reference in fp32
    torch_bf16, _ = naive_attention(q, k, v, causal, dtype=torch.bfloat16)
    _check_bf16_kernel(real, exact, torch_bf16, "flash_attn_func")
    if causal and tq > tk:
        assert torch.all(real[:, : tq - tk] == 0)  # queries that see no key


@pytest.mark.gpu
def test_gpu_varlen_and_kvcache_match_reference():
    _require_flash_attn_cuda()
    import flash_attn

    torch.manual_seed(21)
    dev, dt = "cuda", torch.bfloat16
    lens_q, lens_k = [5, 33, 1, 17], [5, 40, 9, 17]
    q = torch.randn(sum(lens_q), 4, 64, device=dev, dtype=dt)
    k = torch.randn(sum(lens_k), 2, 64, device=dev, dtype=dt)
    v = torch.randn(sum(lens_k), 2, 64, device=dev, dtype=dt)
    cu_q = torch.tensor([0, 5, 38, 39, 56], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 5, 45, 54, 71], dtype=torch.int32, device=dev)
    real = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 40, causal=True)
    exact = flash_attn_varlen_func(q.float(), k.float(), v.float(), cu_q, cu_k, 33, 40, causal=True)
    torch_bf16 = torch.cat(
        [
            naive_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], True, dtype=dt)[0][0]
            for q0, q1, k0, k1 in zip(
                cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(), strict=True
            )
        ]
    )
    _check_bf16_kernel(real, exact, torch_bf16, "flash_attn_varlen_func")

    k_cache = torch.randn(3, 64, 2, 64, device=dev, dtype=dt)
    v_cache = torch.randn(3, 64, 2, 64, device=dev, dtype=dt)
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor([0, 10, 30], dtype=torch.int32, device=dev)
    q = torch.randn(3, 2, 4, 64, device=dev, dtype=dt)
    k_new, v_new = torch.randn(3, 2, 2, 64, device=dev, dtype=dt), torch.randn(3, 2, 2, 64, device=dev, dtype=dt)
    real = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)
    ours = flash_attn_with_kvcache(q, k_cache_ref, v_cache_ref, k_new, v_new, cache_seqlens=seqlens, causal=True)
    assert torch.equal(k_cache, k_cache_ref) and torch.equal(v_cache, v_cache_ref)
    assert _record("gpu bf16 with_kvcache real vs reference", _max_diff(real, ours)) <= BF16_TOL


@pytest.mark.gpu
def test_gpu_adapter_matches_reference_adapter():
    _require_flash_attn_cuda()
    torch.manual_seed(22)
    B, S = 3, 16
    kpm = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    kpm[:, :11] = True  # a static cache with 5 unused slots
    kpm[1, :2] = False  # and left padding
    for T in (11, 1):
        query, key, value = (x.cuda().bfloat16() for x in _qkv(B, 4, 2, T, S, D=64))
        for mask in (VarlenMask(), VarlenMask(kpm)):
            real, _ = flash.flash_attention_2_forward(_module(64, 2), query, key, value, mask, 0.125, 0.0)
            ours, _ = flash.flash_reference_forward(_module(64, 2), query, key, value, mask, 0.125, 0.0)
            assert real.dtype == torch.bfloat16
            assert _record("gpu bf16 adapter real vs reference", _max_diff(real, ours)) <= BF16_TOL
    # fp32 in: bf16 inside the CUDA kernel, fp32 out
    query, key, value = (x.cuda() for x in _qkv(B, 4, 2, 1, S, D=64))
    real, _ = flash.flash_attention_2_forward(_module(64, 2), query, key, value, VarlenMask(kpm), 0.125, 0.0)
    ours, _ = flash.flash_reference_forward(_module(64, 2), query, key, value, VarlenMask(kpm), 0.125, 0.0)
    assert real.dtype == torch.float32
    assert _record("gpu fp32->bf16 adapter real vs reference", _max_diff(real, ours)) <= BF16_TOL
