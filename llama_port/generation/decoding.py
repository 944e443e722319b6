"""The decode loops: after the prefill, one forward per new token over the KV cache.

A decoder is a callable: each step's tokens (B, 1) in, the next-token logits (B, V) out, keeping
the positions, the cache slot and the mask up to date itself.

* :class:`StaticDecoder` (static cache) is built for low per-token overhead, as gpt-fast's: the
  keys and values go into preallocated buffers at ``cache_position``; the mask is a
  :class:`~llama_port.attention.masks.DecodeMask` over the whole cache, opened one slot per step in
  place; positions and the slot are tensors incremented in place. So ``compile=True`` captures one
  graph for the whole decode and never recompiles per token.
* :class:`DynamicDecoder` (dynamic cache) follows transformers' generate step for step: the 2-D
  padding mask grows by a column and the model builds its mask from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..attention.masks import DecodeMask, PreparedMask
from ..cache import DynamicCache, KVCache, StaticCache

DecodeStep = Callable[[nn.Module, Tensor, Tensor, Tensor, PreparedMask, KVCache], Tensor]


def decode_step(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    cache_position: Tensor,
    attention_mask: PreparedMask,
    past_key_values: KVCache,
) -> Tensor:
    """One token per row (B, 1) at ``position_ids`` (B, 1), written to cache slot ``cache_position``
    (1,) -> next-token logits (B, V). What ``compile=True`` hands to torch.compile."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=True,
        cache_position=cache_position,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


def prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
    """The prompt (B, T), left-padded, into ``cache`` -> (next-token logits (B, V), the next
    position of each row (B, 1)). As transformers: positions count real tokens; pads sit at 0
    (their keys are masked anyway)."""
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]  # (B, V)
    return logits, position_ids[:, -1:] + 1  # left padding, so each row's last token is real


class StaticDecoder:
    """The static-cache decode loop's state: slot, positions and mask as tensors updated in place.

    step: ``decode_step`` or its compiled form; ``compiled`` says which (a compiled step skips the
    cache's host counter, which is advanced here instead)."""

    def __init__(
        self,
        model: nn.Module,
        cache: StaticCache,
        attention_mask: Tensor,
        next_position: Tensor,
        step: DecodeStep,
        compiled: bool,
    ) -> None:
        self.model = model
        self.cache = cache
        self.position_ids = next_position  # (B, 1)
        self.cache_position = torch.tensor([attention_mask.shape[1]], device=attention_mask.device)  # (1,)
        self.mask = DecodeMask(model.attention_backend.mask_format, attention_mask, cache.max_cache_len, model.dtype)
        self.step = step
        self.compiled = compiled

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B, 1) -> next-token logits (B, V)."""
        self.mask.open(self.cache_position)
        if self.compiled and self.cache_position.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.step(self.model, tokens, self.position_ids, self.cache_position, self.mask.prepared, self.cache)
        if self.compiled:
            self.cache.advance(1)  # the compiled update skipped the host counter (see StaticCache)
        self.cache_position += 1
        self.position_ids += 1
        return logits


class DynamicDecoder:
    """The dynamic-cache decode loop: the 2-D padding mask grows by a column and the model builds
    its mask from it, exactly as transformers' generate does."""

    def __init__(self, model: nn.Module, cache: DynamicCache, attention_mask: Tensor, next_position: Tensor) -> None:
        self.model = model
        self.cache = cache
        self.attention_mask = attention_mask  # (B, S)
        self.position_ids = next_position  # (B, 1)

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B, 1) -> next-token logits (B, V)."""
        ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)  # (B, S + 1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.position_ids = self.position_ids + 1
        return out.logits[:, -1, :]
