"""PyTorch's fused ``scaled_dot_product_attention`` (flash / memory-efficient / math kernels).

Mirrors transformers' sdpa integration branch for branch, because each branch (native GQA, the
single-token GQA packing, repeat_kv) rounds differently and parity is bit-level. One departure:
a one-token step is packed under torch.compile too (below).
"""

from __future__ import annotations

from torch import Tensor, nn

from .eager import repeat_kv

_MAX_NATIVE_GQA_HEAD_DIM = 256


def _pack_gqa(hidden_states: Tensor, n_rep: int) -> Tensor:
    """One query token: (B, H, 1, D) -> (B, Hkv, n_rep, D), so the n_rep query heads of a group sit
    where the query length was and attend to their shared key/value head without repeat_kv."""
    if hidden_states.shape[1] == 1:
        return hidden_states
    batch, num_heads, _, dim = hidden_states.shape
    return hidden_states.reshape(batch, num_heads // n_rep, n_rep, dim)


def sdpa_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scaling: float,
    dropout: float,
) -> tuple[Tensor, None]:
    """query (B, H, T, D), key/value (B, Hkv, S, D), mask bool (B, 1, T, S) (True = attend) or None
    for plain causal attention -> ((B, T, H, D), None)."""
    q_length = query.shape[2]
    n_rep = module.num_key_value_groups
    gqa_kwargs = {}
    if n_rep > 1:
        if mask is None and key.shape[-1] == value.shape[-1] <= _MAX_NATIVE_GQA_HEAD_DIM:
            gqa_kwargs["enable_gqa"] = True
        elif isinstance(q_length, int) and q_length == 1:
            # Also under torch.compile, where transformers repeats the keys and values instead
            # (its branch is `not is_torchdynamo_compiling()`): a compiled one-token step with
            # static shapes (generate(compile=...)) then skips two copies per layer, measured
            # +5-10 % decode on SmolLM2-135M (fp32 compile=True, bf16/int8 max-autotune; README),
            # with fp32 greedy tokens unchanged. A symbolic length (dynamic shapes) keeps
            # repeat_kv, so no guard on it is added.
            query = _pack_gqa(query, n_rep)  # (B, Hkv, n_rep, D)
        else:
            key = repeat_kv(key, n_rep)
            value = repeat_kv(value, n_rep)

    # With no mask, SDPA's own causal flag is exact when T == S (upper-left and lower-right
    # alignment agree) and unneeded for a single query token.
    is_causal = q_length > 1 and mask is None
    if is_causal and key.shape[2] > q_length:
        # A static cache prefilled from position 0: the slots past the prompt are still empty.
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]

    attn_output = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, **gqa_kwargs
    )
    attn_output = attn_output.reshape(attn_output.shape[0], -1, q_length, value.shape[-1])  # (B, H, T, D)
    return attn_output.transpose(1, 2).contiguous(), None  # (B, T, H, D)
