"""Every non-transformers checkpoint's tensor names, as data, and the layout transforms beside them.

Tables map a format's names to transformers' (``{i}`` stands for the layer index). The one layout
transform both readers need is ``permute_for_rope``: Meta's rotary layout -> transformers'. Meta
rotates interleaved pairs (x0, x1), (x2, x3), ... of each head (``torch.view_as_complex``);
transformers' ``rotate_half`` rotates the split halves (x_j, x_{j + D/2}). Reordering the output
rows of ``wq``/``wk`` per head turns one into the other, and q.k is unchanged because q and k are
reordered alike. llama.cpp's convert_hf_to_gguf.py reorders transformers' q/k rows back to the
interleaved layout (ggml's "normal" RoPE rotates adjacent pairs as Meta's code does), so a GGUF's
q/k rows are in Meta's layout too. (Nothing here writes Meta or GGUF files, so the inverse
transform has no caller and is not kept.)
"""

from __future__ import annotations

import re
from functools import lru_cache

from torch import Tensor

from .errors import ShapeMismatchError, UnsupportedCheckpointError

# ------------------------------------------------------------------------------ Meta's consolidated.*.pth
HF_FROM_META: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}

# Tensors Meta's files hold that are not weights: Llama 1/2 save the rotary buffer ``rope.freqs``,
# which transformers (and we) recompute from rope_theta.
META_IGNORED = ("rope.freqs",)

# Which dimension each model-parallel shard splits (fairscale's layers in Meta's model.py):
# ColumnParallelLinear splits its output features (dim 0), RowParallelLinear its input features
# (dim 1), RMSNorm weights are replicated (None). The embedding is the exception: Llama 1/2's
# ParallelEmbedding splits the embedding dim (1), Llama 3's VocabParallelEmbedding the vocabulary
# (0), which is why transformers' convert_llama_weights_to_hf.py concatenates it along 0 for
# llama_version 3/3.1 and 1 otherwise. The table holds Llama 2's 1; meta.py tells the two apart by
# the shards' shapes (a shard holding all ``dim`` columns was split along the vocabulary).
META_SHARD_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "layers.{i}.attention_norm.weight": None,
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.ffn_norm.weight": None,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w2.weight": 1,
    "layers.{i}.feed_forward.w3.weight": 0,
}

# ----------------------------------------------------------------------------------------------- GGUF
# llama.cpp's names (gguf-py's tensor_mapping.py, MODEL_ARCH.LLAMA). Biases appear only in
# fine-tunes with attention_bias / mlp_bias; Meta's LLaMA has none.
HF_FROM_GGUF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}

# llama.cpp stores Llama 3.1's rotary scaling as a tensor of per-frequency divisors (written by
# convert_hf_to_gguf.py's generate_extra_tensors); gguf.py turns it back into rope_parameters.
GGUF_ROPE_FREQS = "rope_freqs.weight"


# ----------------------------------------------------------------------------------- name mapping
@lru_cache(maxsize=None)
def _compiled(table_items: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple(
        (re.compile(re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z"), dst) for src, dst in table_items
    )


def map_name(name: str, table: dict[str, str], source: str = "checkpoint") -> str:
    """``name`` through ``table`` (templates with ``{i}``); UnsupportedCheckpointError if none matches.

    ``map_name("blk.3.attn_q.weight", HF_FROM_GGUF) == "model.layers.3.self_attn.q_proj.weight"``.
    """
    for pattern, dst in _compiled(tuple(table.items())):
        match = pattern.match(name)
        if match:
            return dst.format(**match.groupdict())
    raise UnsupportedCheckpointError(
        f"{source}: tensor {name!r} is not a LLaMA tensor this reader knows; expected one of {sorted(table)}"
    )


def template_of(name: str, table: dict[str, str]) -> str | None:
    """The table key ``name`` matches (``"layers.3.attention.wq.weight"`` -> ``"layers.{i}.attention.wq.weight"``)."""
    for (src, _), (pattern, _) in zip(table.items(), _compiled(tuple(table.items()))):
        if pattern.match(name):
            return src
    return None


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to in any of the formats (``layers.3.`` / ``blk.3.`` /
    ``model.layers.3.``), or None for embeddings, final norm and head."""
    match = re.match(r"(?:model\.)?(?:layers|blk)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------ transforms
def permute_for_rope(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved q/k rows -> transformers' half-split rows, per head.

    w: (n_heads * D, C) weight or (n_heads * D,) bias; for k under GQA n_heads is the number of
    key/value heads. Within a head, Meta's row order is (re0, im0, re1, im1, ...); transformers'
    is (re0, re1, ..., im0, im1, ...).
    """
    rows = w.shape[0]
    assert rows % (2 * n_heads) == 0, f"{rows} rows do not split into {n_heads} heads of even size"
    half = rows // n_heads // 2
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(w.shape)  # (H, 2, D/2, ...) -> rows


def interleaved_to_half_split(w: Tensor, n_heads: int, head_dim: int, where: str) -> Tensor:
    """``permute_for_rope`` for a q/k tensor read from a Meta or GGUF file (both store Meta's
    interleaved layout), after checking it holds n_heads x head_dim rows (ShapeMismatchError
    naming ``where`` otherwise)."""
    if w.shape[0] != n_heads * head_dim:
        raise ShapeMismatchError(f"{where} has {w.shape[0]} rows; expected {n_heads} heads x head_dim {head_dim}")
    return permute_for_rope(w, n_heads)


__all__ = [
    "GGUF_ROPE_FREQS",
    "HF_FROM_GGUF",
    "HF_FROM_META",
    "interleaved_to_half_split",
    "META_IGNORED",
    "META_SHARD_DIM",
    "layer_index",
    "map_name",
    "permute_for_rope",
    "template_of",
]
