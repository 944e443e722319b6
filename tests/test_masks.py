"""attention/masks.py on its own: every mask format against an independent construction of the
same rule (a query at position p sees the real keys at positions <= p, and in packed rows only its
own document), the in-place decode mask against a freshly built one, and forward's checks."""

from __future__ import annotations

import pytest
import torch

import llama_port
from llama_port.attention.masks import (
    DecodeMask,
    PreparedMask,
    VarlenMask,
    build_attention_mask,
    find_packed_documents,
    mask_for_forward,
)
from llama_port.cache import DynamicCache, StaticCache
from conftest import tiny_config_dict

LEFT_PADDED = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # (B, S) 1 = real


def expected_allowed(padding: torch.Tensor, q_length: int, q_offset: int) -> torch.Tensor:
    """(B, 1, T, S) bool written out one entry at a time: causal by slot, real keys only."""
    B, S = padding.shape
    allowed = torch.zeros(B, 1, q_length, S, dtype=torch.bool)
    for b in range(B):
        for t in range(q_length):
            for s in range(S):
                allowed[b, 0, t, s] = s <= t + q_offset and bool(padding[b, s])
    return allowed


def build(fmt: str, padding: torch.Tensor | None, q_length: int, kv_length: int, q_offset: int = 0, **kw):
    batch = padding.shape[0] if padding is not None else kw.pop("batch_size", 1)
    defaults = dict(position_ids=None, has_cache=False, static_cache=False)
    defaults.update(kw)
    return build_attention_mask(
        fmt, batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        attention_mask=padding, dtype=torch.float32, device=torch.device("cpu"), **defaults,
    )


def test_bool_and_additive_follow_the_rule_with_left_padding():
    allowed = expected_allowed(LEFT_PADDED, 5, 0)
    assert torch.equal(build("bool", LEFT_PADDED, 5, 5), allowed)
    additive = build("additive", LEFT_PADDED, 5, 5)
    assert additive.shape == (3, 1, 5, 5) and additive.dtype == torch.float32
    assert torch.equal(additive == 0, allowed)
    assert torch.all(additive[~allowed] == torch.finfo(torch.float32).min)


def test_queries_after_a_cache_see_the_cached_keys():
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    got = build("bool", padding, q_length=3, kv_length=7, q_offset=4, has_cache=True)
    assert torch.equal(got, expected_allowed(padding, 3, 4))


def test_sdpa_gets_no_mask_where_plain_causal_is_exact():
    assert build("bool", None, 6, 6, batch_size=2) is None  # no padding
    assert build("bool", torch.ones(2, 6, dtype=torch.long), 6, 6) is None  # padding all real
    assert build("bool", torch.ones(2, 7, dtype=torch.long), 1, 7, q_offset=6, has_cache=True) is None  # decode
    # Prefill of an empty static cache: only the unwritten slots past the prompt are masked.
    static = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert build("bool", static, 3, 6, has_cache=True, static_cache=True) is None
    # ... but a single query on a static cache must mask the unwritten slots.
    got = build("bool", static, 1, 6, q_offset=2, has_cache=True, static_cache=True)
    assert torch.equal(got, expected_allowed(static, 1, 2))


def test_packed_documents_from_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    documents = find_packed_documents(positions)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2]]
    assert find_packed_documents(torch.arange(6)[None]) is None
    got = build("bool", None, 6, 6, batch_size=1, position_ids=positions)
    same_doc = documents[0][:, None] == documents[0][None, :]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(got[0, 0], same_doc & causal)
    varlen = build("varlen", None, 6, 6, batch_size=1, position_ids=positions)
    assert varlen.packed_cu_seqlens.tolist() == [0, 3, 5, 6] and varlen.packed_max_seqlen == 3
    assert varlen.packed_cu_seqlens.dtype == torch.int32 and varlen.key_padding_mask is None


def test_varlen_key_padding():
    assert build("varlen", torch.ones(2, 4, dtype=torch.long), 4, 4) == VarlenMask()
    varlen = build("varlen", LEFT_PADDED, 5, 5)
    assert torch.equal(varlen.key_padding_mask, LEFT_PADDED.bool())
    # A static cache without a padding mask: the unwritten slots are not real keys.
    varlen = build("varlen", None, 2, 6, q_offset=1, batch_size=2, has_cache=True, static_cache=True)
    assert varlen.key_padding_mask.tolist() == [[True, True, True, False, False, False]] * 2


def test_traced_masks_skip_the_value_shortcuts(monkeypatch):
    """Under torch.compile / torch.export no shortcut reads a tensor's values: the full mask, the
    same attention pattern as eager's shortcut; shape-only shortcuts (no padding mask) stay."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ones = torch.ones(2, 6, dtype=torch.long)
    assert torch.equal(build("bool", ones, 6, 6), expected_allowed(ones, 6, 0))
    static = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert torch.equal(build("bool", static, 3, 6, has_cache=True, static_cache=True), expected_allowed(static, 3, 0))
    assert build("bool", None, 6, 6, batch_size=2, has_cache=True) is None
    assert find_packed_documents(torch.arange(6)[None]).tolist() == [[0] * 6]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(build("bool", None, 6, 6, batch_size=1, position_ids=torch.arange(6)[None])[0, 0], causal)
    assert torch.equal(build("varlen", ones, 6, 6).key_padding_mask, ones.bool())


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match=r"mask_format='nope'; expected one of \['additive', 'bool', 'varlen'\]"):
        build("nope", LEFT_PADDED, 5, 5)
    with pytest.raises(ValueError, match="mask_format='nope'"):
        DecodeMask("nope", LEFT_PADDED, 8, torch.float32)


def test_mask_for_forward_sizes_the_keys_by_the_cache():
    config = llama_port.LlamaConfig(**tiny_config_dict())
    cache = DynamicCache()
    cache.update(torch.zeros(3, 2, 4, 16), torch.zeros(3, 2, 4, 16), 0)
    padding = torch.cat([LEFT_PADDED[:, :4], torch.ones(3, 1, dtype=torch.long)], dim=1)  # (B, 4 cached + 1)
    got = mask_for_forward("bool", padding, position_ids=torch.zeros(3, 1, dtype=torch.long), past_key_values=cache,
                           past_seen=4, batch_size=3, q_length=1, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(got, expected_allowed(padding, 1, 4))
    static = StaticCache(config, 3, 9)
    got = mask_for_forward("additive", padding, position_ids=torch.zeros(3, 1, dtype=torch.long),
                           past_key_values=static, past_seen=4, batch_size=3, q_length=1,
                           dtype=torch.float32, device=torch.device("cpu"))
    assert got.shape == (3, 1, 1, 9)  # the whole preallocated cache, unwritten slots masked
    assert torch.equal(got == 0, expected_allowed(torch.nn.functional.pad(padding, (0, 4)), 1, 4))


@pytest.mark.parametrize("fmt", ["bool", "additive", "varlen"])
def test_decode_mask_updated_in_place_equals_a_fresh_one(fmt):
    prompt = LEFT_PADDED  # (B, T = 5)
    cache_len = 9
    decode = DecodeMask(fmt, prompt, cache_len, torch.float32)
    value = decode.prepared.value
    assert decode.prepared.mask_format == fmt
    for step in range(3):
        slot = torch.tensor([prompt.shape[1] + step])
        decode.open(slot)
        written = torch.cat([prompt, torch.ones(3, step + 1, dtype=torch.long)], dim=1)
        padded = torch.nn.functional.pad(written, (0, cache_len - written.shape[1]))
        fresh = build(fmt, padded, 1, cache_len, q_offset=int(slot), has_cache=True, static_cache=True)
        if fmt == "varlen":
            assert torch.equal(decode.prepared.value.key_padding_mask, fresh.key_padding_mask)
        else:
            assert torch.equal(decode.prepared.value, fresh)
        assert decode.prepared.value is value  # same object, same storage: a compiled step sees the update


def test_forward_checks_the_mask_it_is_given():
    config = llama_port.LlamaConfig(**tiny_config_dict())
    model = llama_port.LlamaForCausalLM(config, attn_implementation="sdpa").eval()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="PreparedMask in format 'additive', but attn_implementation='sdpa' takes 'bool'"):
        model(ids, attention_mask=PreparedMask("additive", None))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 1, 3, 3\); expected a \(B, S\) padding mask"):
        model(ids, attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with torch.no_grad():  # a prepared None (plain causal) is the same as no mask
        torch.testing.assert_close(model(ids, attention_mask=PreparedMask("bool", None)).logits, model(ids).logits,
                                   rtol=0, atol=0)
