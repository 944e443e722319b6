"""Key/value caches: what attention layers keep of past tokens so decoding costs O(T) per token.

Both caches hold one (B, Hkv, S, D) key and value tensor per layer and share one interface:

* ``update(key, value, layer_idx, cache_position)`` stores the new (B, Hkv, T, D) keys/values and
  returns everything the layer must attend to;
* ``get_seq_length()`` is the number of tokens stored; ``kv_length(q_length)`` the key length the
  next forward's attention will see (what its mask must cover);
* ``crop(max_length)`` forgets everything past ``max_length`` tokens; ``reset()`` forgets everything.

``DynamicCache`` grows by concatenation. ``StaticCache`` is preallocated to ``max_cache_len`` and
written in place at ``cache_position`` (``k_cache[:, :, cache_position] = k``, as gpt-fast does), so
its shapes never change and ``torch.compile`` / CUDA graphs can capture the decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .configuration import LlamaConfig


class DynamicCache:
    """A cache that grows with every forward (torch.cat along the sequence axis)."""

    is_static = False

    def __init__(self) -> None:
        self.key_cache: list[Tensor] = []
        self.value_cache: list[Tensor] = []

    def update(self, key: Tensor, value: Tensor, layer_idx: int, cache_position: Tensor | None = None):
        """Append key/value (B, Hkv, T, D) to layer ``layer_idx``; returns its (B, Hkv, S, D) pair.

        ``cache_position`` is ignored: new tokens always go after the stored ones."""
        if layer_idx == len(self.key_cache):
            self.key_cache.append(key)
            self.value_cache.append(value)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored (in layer ``layer_idx``; all layers agree between forwards)."""
        return self.key_cache[layer_idx].shape[-2] if layer_idx < len(self.key_cache) else 0

    def kv_length(self, q_length: int) -> int:
        return self.get_seq_length() + q_length

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (a negative value drops that many from the end)."""
        if max_length < 0:
            max_length = max(self.get_seq_length() + max_length, 0)
        for i in range(len(self.key_cache)):
            self.key_cache[i] = self.key_cache[i][..., :max_length, :]
            self.value_cache[i] = self.value_cache[i][..., :max_length, :]

    def reset(self) -> None:
        """Forget every stored token."""
        self.key_cache.clear()
        self.value_cache.clear()


class StaticCache:
    """A cache preallocated to (max_batch_size, Hkv, max_cache_len, D) per layer, written in place.

    The number of stored tokens is tracked on the host (``seq_length``, advanced by the last layer's
    update), so reading it never synchronises with the device. That bookkeeping and the overflow
    check are skipped while torch.compile traces ``update``: a Python int read or written inside a
    compiled graph is baked into it as a constant, and the graph would be recompiled every token.
    A compiled decode step therefore takes ``cache_position`` as a tensor and its caller records
    what it wrote with ``advance(T)`` (generate() does).
    """

    is_static = True

    def __init__(
        self,
        config: LlamaConfig,
        max_batch_size: int,
        max_cache_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        num_key_value_heads: int | None = None,
    ) -> None:
        """num_key_value_heads: the heads this process computes (key_value_heads(model)); default
        config.num_key_value_heads, which a tensor-parallel model holds 1 / N of."""
        if max_cache_len < 1 or max_batch_size < 1:
            raise ValueError(
                f"StaticCache: max_batch_size={max_batch_size}, max_cache_len={max_cache_len}; both must be >= 1"
            )
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
        self.num_layers = config.num_hidden_layers
        heads = config.num_key_value_heads if num_key_value_heads is None else num_key_value_heads
        shape = (max_batch_size, heads, max_cache_len, config.head_dim)
        self.key_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.num_layers)]
        self.value_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.num_layers)]
        if self.key_cache[0].device.type == "cuda":
            # CUDA graphs replay fixed addresses: marking the buffers static lets a "reduce-overhead"
            # compiled step mutate them in place instead of skipping the graph.
            for buffer in self.key_cache + self.value_cache:
                torch._dynamo.mark_static_address(buffer)
        self.seq_length = 0

    def update(self, key: Tensor, value: Tensor, layer_idx: int, cache_position: Tensor | None = None):
        """Write key/value (B, Hkv, T, D) at ``cache_position`` (T,) (default: right after what is
        stored); returns the whole (B, Hkv, max_cache_len, D) buffers of layer ``layer_idx``.

        Writes are appends: ``cache_position`` is expected to be ``seq_length .. seq_length + T - 1``
        (after a ``crop`` too), which is what the host counter assumes."""
        batch, _, q_length, _ = key.shape
        if batch != self.max_batch_size:
            raise ValueError(f"StaticCache was built for batch size {self.max_batch_size}, got {batch}")
        if not torch.compiler.is_compiling():
            end = self.seq_length + q_length
            if end > self.max_cache_len:
                raise ValueError(
                    f"StaticCache holds {self.max_cache_len} tokens; writing {q_length} after "
                    f"{self.seq_length} overflows it"
                )
            if cache_position is None:
                cache_position = torch.arange(self.seq_length, end, device=key.device)
            if layer_idx == self.num_layers - 1:
                self.seq_length = end
        k_out, v_out = self.key_cache[layer_idx], self.value_cache[layer_idx]
        # In place at fixed addresses (gpt-fast's k_out[:, :, input_pos] = k): what CUDA graphs need.
        k_out.index_copy_(2, cache_position, key.to(k_out.dtype))
        v_out.index_copy_(2, cache_position, value.to(v_out.dtype))
        return k_out, v_out

    def advance(self, num_tokens: int) -> None:
        """Record ``num_tokens`` written by a compiled step (whose update skipped the host counter)."""
        if self.seq_length + num_tokens > self.max_cache_len:
            raise ValueError(
                f"StaticCache holds {self.max_cache_len} tokens; advancing {num_tokens} after "
                f"{self.seq_length} overflows it"
            )
        self.seq_length += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored (a host int: no device synchronisation)."""
        return self.seq_length

    def kv_length(self, q_length: int) -> int:
        """Always the whole buffer: attention sees every slot, the mask hides the unwritten ones."""
        return self.max_cache_len

    def crop(self, max_length: int) -> None:
        """Forget tokens past ``max_length`` (a negative value drops that many from the end); their
        slots are zeroed, so a later reader sees no stale data."""
        if max_length < 0:
            max_length = max(self.seq_length + max_length, 0)
        for k, v in zip(self.key_cache, self.value_cache):
            k[:, :, max_length:].zero_()
            v[:, :, max_length:].zero_()
        self.seq_length = min(self.seq_length, max_length)

    def reset(self) -> None:
        """Empty the cache, keeping its buffers (for the next generate call)."""
        self.crop(0)


KVCache = DynamicCache | StaticCache


def key_value_heads(model: torch.nn.Module) -> int:
    """The key/value heads ``model`` computes in this process: k_proj's local output rows / head_dim,
    i.e. config.num_key_value_heads, or 1 / N of it when k_proj is split N ways by tensor
    parallelism (its weight a DTensor holding this rank's rows). The one place a cache learns it."""
    attention = model.get_decoder().layers[0].self_attn
    weight = attention.k_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight  # (Hkv / N * D, C) under TP
    return local.shape[0] // attention.head_dim
