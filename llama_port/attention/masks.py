"""Every mask the model hands to attention backends is built, and updated, here.

Every backend has the same signature (see ``llama_port.attention``); what differs is the form of
``mask`` it wants, declared by ``AttentionBackend.mask_format``:

* ``"additive"`` (eager): a float tensor (B, 1, T, S) holding 0 where a query may attend and the
  dtype's minimum where it may not. Always built.
* ``"bool"`` (sdpa): a bool tensor (B, 1, T, S), True where a query may attend, or ``None`` when
  plain causal attention is exact (no padding, no packing), so SDPA can use its fused causal path.
* ``"varlen"`` (flash_attention_2, flash_reference): a :class:`VarlenMask`, which the flash kernels
  turn into cu_seqlens for ``flash_attn_varlen_func``.

Traced (``torch.compile``, ``torch.export``: ``torch.compiler.is_compiling()``), no Python decision
reads a tensor's values: the shortcuts that need one (SDPA's causal flag when the padding mask is
all ones, dropping a one-document packing mask, dropping an all-real varlen key mask) are skipped
and the full mask, always correct, is built from tensors alone. Eager keeps the shortcuts.

Three entry points: :func:`mask_for_forward` is what ``LlamaModel.forward`` calls with the user's
(B, S) padding mask; :class:`DecodeMask` is the mask of a static-cache decode loop, built once and
updated in place one column per token; :class:`PreparedMask` carries a mask already in a backend's
format into ``forward`` (what the decode loop passes), so forward never guesses what a tensor is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK_FORMATS = ("additive", "bool", "varlen")


@dataclass(frozen=True)
class VarlenMask:
    """Where the real tokens are, in the form FlashAttention's varlen kernels want.

    key_padding_mask: (B, S) bool, True for a real key; S is the length of the keys the backend is
        given (cached + new, and for a static cache its whole preallocated length, unused slots
        False). Each row's T queries are the T key columns ending at its last real key (so a
        left-padded prompt's pad queries sit on padded columns and get zero output). ``None``:
        every key is real.
    packed_cu_seqlens: (N + 1,) int32 offsets of N documents packed into the flattened (B * T)
        queries, from position_ids that restart at 0 or given by the caller; only without a cache.
        ``None``: one document per row.
    packed_max_seqlen: length of the longest packed document (with ``packed_cu_seqlens``).
    """

    key_padding_mask: Tensor | None = None
    packed_cu_seqlens: Tensor | None = None
    packed_max_seqlen: int | None = None


# What a backend's ``mask`` argument holds, by mask_format: additive / bool tensor, None, VarlenMask.
BackendMask = Tensor | VarlenMask | None


@dataclass(frozen=True)
class PreparedMask:
    """A mask already in a backend's ``mask_format``; ``LlamaModel.forward`` hands ``value`` to the
    attention layers as is and, given ``cache_position`` too, reads no host-side cache state."""

    mask_format: str
    value: BackendMask


def find_packed_documents(position_ids: Tensor) -> Tensor | None:
    """(B, T) positions -> (B, T) document index per token, or None when each row is one document
    (in eager mode only: traced, the indices are returned whatever they hold).

    A new document starts wherever the position does not follow its predecessor by 1 (the usual
    packing: positions restart at 0 for each document).
    """
    first = position_ids[:, :1] - 1  # so the first token of a row always counts as "following"
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    documents = starts.cumsum(-1)
    if not torch.compiler.is_compiling() and bool((documents[:, -1] == 0).all()):
        return None
    return documents


def build_attention_mask(
    mask_format: str,
    *,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    has_cache: bool,
    static_cache: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> BackendMask:
    """The mask for ``mask_format`` (see the module docstring), built once per forward.

    attention_mask: (B, >= seen + T) 2-D padding mask, 1 for real tokens, or None.
    q_offset: tokens already in the cache; queries sit at positions q_offset .. q_offset + T - 1.
    kv_length: length of the keys the backend will get (cached + T, or a static cache's full length).
    Packing (documents restarting their position_ids) is honoured only with no padding mask and no
    cache, as transformers does.
    """
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)
        if padding.shape[-1] < kv_length:  # a static cache's slots past the mask are empty
            padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]))
        padding = padding[:, :kv_length]
    documents = None
    if position_ids is not None and attention_mask is None and not has_cache:
        documents = find_packed_documents(position_ids.expand(batch_size, -1))

    if mask_format == "varlen":
        return _varlen_mask(padding, documents, batch_size, q_length, kv_length, q_offset, device)

    if mask_format == "bool" and documents is None and not (static_cache and q_length == 1):
        if _plain_causal_is_exact(padding, q_length, kv_length, q_offset):
            return None

    q_idx = torch.arange(q_length, device=device) + q_offset
    kv_idx = torch.arange(kv_length, device=device)
    allowed = (kv_idx[None, :] <= q_idx[:, None])[None, None]  # (1, 1, T, S) causal
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]  # (B, 1, T, S)
    if documents is not None:
        # Same document only, and causal by position within it (T == S here: no cache).
        allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
    allowed = allowed.expand(batch_size, 1, q_length, kv_length)
    if mask_format == "bool":
        return allowed
    if mask_format == "additive":
        return torch.where(allowed, torch.zeros((), device=device, dtype=dtype), torch.finfo(dtype).min)
    raise ValueError(f"mask_format={mask_format!r}; expected one of {list(MASK_FORMATS)}")


def mask_for_forward(
    mask_format: str,
    attention_mask: Tensor | None,
    *,
    position_ids: Tensor,
    past_key_values: object | None,
    past_seen: int,
    batch_size: int,
    q_length: int,
    dtype: torch.dtype,
    device: torch.device,
) -> BackendMask:
    """The mask of one forward over T = q_length new tokens, from the user's padding mask.

    attention_mask: (B, S) 1 for real tokens, 0 for padding (S = cached + T), or None.
    past_key_values: the KV cache the forward reads (its ``kv_length`` sizes the keys; a static
        cache's unwritten slots are masked), or None. past_seen: tokens already in it.
    """
    if past_key_values is not None:
        kv_length = past_key_values.kv_length(q_length)
    else:
        kv_length = attention_mask.shape[-1] if attention_mask is not None else q_length
    return build_attention_mask(
        mask_format,
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=past_seen,
        attention_mask=attention_mask,
        position_ids=position_ids,
        has_cache=past_key_values is not None,
        static_cache=getattr(past_key_values, "is_static", False),
        dtype=dtype,
        device=device,
    )


class DecodeMask:
    """The mask of a static-cache decode loop, built once and updated in place.

    Holds a (B, S) key mask over the whole cache (the prompt's padding, then unwritten slots False)
    and its view in ``mask_format``: bool (B, 1, 1, S) sharing the key mask's memory, additive
    (B, 1, 1, S) in ``dtype``, or a VarlenMask over the key mask. A single query token needs no
    causal part (every written slot is in its past), so opening its slot is the only update there
    is, and the tensors keep their addresses: what a compiled (CUDA-graph) decode step needs.
    """

    def __init__(self, mask_format: str, prompt_mask: Tensor, cache_len: int, dtype: torch.dtype) -> None:
        batch, prompt_length = prompt_mask.shape
        device = prompt_mask.device
        self.key_mask = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)  # (B, S)
        self.key_mask[:, :prompt_length] = prompt_mask.bool()
        self.additive: Tensor | None = None
        if mask_format == "bool":
            value: BackendMask = self.key_mask[:, None, None, :]  # (B, 1, 1, S) view: updates show through
        elif mask_format == "additive":
            self.additive = torch.full((batch, 1, 1, cache_len), torch.finfo(dtype).min, dtype=dtype, device=device)
            self.additive.masked_fill_(self.key_mask[:, None, None, :], 0.0)
            value = self.additive  # (B, 1, 1, S)
        elif mask_format == "varlen":
            value = VarlenMask(key_padding_mask=self.key_mask)
        else:
            raise ValueError(f"mask_format={mask_format!r}; expected one of {list(MASK_FORMATS)}")
        self.prepared = PreparedMask(mask_format, value)

    def open(self, cache_position: Tensor) -> None:
        """Make the key at slot ``cache_position`` (1,) visible: the new token attends to itself."""
        self.key_mask.index_fill_(1, cache_position, True)
        if self.additive is not None:
            self.additive.index_fill_(-1, cache_position, 0.0)


def _plain_causal_is_exact(padding: Tensor | None, q_length: int, kv_length: int, q_offset: int) -> bool:
    """Whether SDPA's own causal flag (upper-left aligned) or no mask at all gives the right answer.
    Traced, a padding mask's values are not read: False whenever there is one."""
    if padding is not None and torch.compiler.is_compiling():
        return False
    if (q_length == 1 or kv_length == q_length) and (padding is None or bool(padding.all())):
        return True
    # Prefill of an empty static cache: only the not-yet-written slots past the prompt are masked.
    return q_offset == 0 and (
        padding is None or (bool(padding[:, :q_length].all()) and not bool(padding[:, q_length:].any()))
    )


def _varlen_mask(
    padding: Tensor | None,
    documents: Tensor | None,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    device: torch.device,
) -> VarlenMask:
    if documents is not None:
        starts = torch.diff(documents, prepend=documents[:, :1] - 1, dim=-1) != 0  # (B, T): row starts count
        start_idx = starts.flatten().nonzero().flatten()
        total = torch.tensor([documents.numel()], device=documents.device)
        cu_seqlens = torch.cat([start_idx, total]).to(torch.int32)
        return VarlenMask(packed_cu_seqlens=cu_seqlens, packed_max_seqlen=int(cu_seqlens.diff().max()))
    if padding is None and kv_length > q_offset + q_length:
        # A static cache without a padding mask: slots past the written ones are not real keys.
        written = torch.arange(kv_length, device=device) < q_offset + q_length
        padding = written.expand(batch_size, kv_length)
    if padding is not None and not torch.compiler.is_compiling() and bool(padding.all()):
        padding = None  # all real: the kernels' dense path
    return VarlenMask(key_padding_mask=padding)
