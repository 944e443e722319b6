"""Eager attention: softmax(Q K^T * scale + mask) V written out with matmuls, as in the paper.

The one backend that can return the attention weights (``output_attentions``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def repeat_kv(hidden_states: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): each key/value head serves n_rep query heads (GQA)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)  # (B, H, S, D)


def eager_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scaling: float,
    dropout: float,
) -> tuple[Tensor, Tensor]:
    """query (B, H, T, D), key/value (B, Hkv, S, D), mask additive (B, 1, T, S) -> ((B, T, H, D), weights (B, H, T, S))."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, H, T, S)
    if mask is not None:
        attn_weights = attn_weights + mask
    # parity: softmax in float32, then back to the activations' dtype, as transformers does.
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)  # (B, H, T, D)
    attn_output = attn_output.transpose(1, 2).contiguous()  # (B, T, H, D)
    return attn_output, attn_weights
