"""DynamicCache and StaticCache: bookkeeping, crop/reset, in-place writes, and the model's logits
with either cache equal to a forward without one."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model, make_port_model, report_max_diff, tiny_config_dict

import llama_port
from llama_port.cache import DynamicCache, StaticCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _kv(batch=2, heads=2, length=3, dim=16, fill=None):
    k = torch.randn(batch, heads, length, dim) if fill is None else torch.full((batch, heads, length, dim), float(fill))
    return k, k + 1


@pytest.fixture(scope="module")
def config():
    return llama_port.LlamaConfig.from_dict(tiny_config_dict())


def test_dynamic_cache_grows_crops_and_resets(config):
    cache = DynamicCache()
    assert cache.get_seq_length() == 0
    for layer in range(config.num_hidden_layers):
        k, v = cache.update(*_kv(length=3), layer)
        assert k.shape == (2, 2, 3, 16)
    assert cache.get_seq_length() == 3 and cache.kv_length(1) == 4
    for layer in range(config.num_hidden_layers):
        k, _ = cache.update(*_kv(length=2), layer)
    assert cache.get_seq_length() == 5 and k.shape[2] == 5
    cache.crop(4)
    assert cache.get_seq_length() == 4
    cache.crop(-1)  # drop one from the end
    assert cache.get_seq_length() == 3
    cache.reset()
    assert cache.get_seq_length() == 0


def test_static_cache_writes_in_place_at_cache_position(config):
    cache = StaticCache(config, max_batch_size=2, max_cache_len=8)
    pointers = [t.data_ptr() for t in cache.key_cache + cache.value_cache]
    for layer in range(config.num_hidden_layers):
        k, v = cache.update(*_kv(length=3, fill=1), layer, torch.arange(3))
        assert k.shape == (2, 2, 8, 16)  # always the whole buffer
    assert cache.get_seq_length() == 3 and cache.kv_length(1) == 8
    for layer in range(config.num_hidden_layers):
        k, v = cache.update(*_kv(length=1, fill=2), layer, torch.tensor([3]))
    assert cache.get_seq_length() == 4
    assert (k[:, :, :3] == 1).all() and (k[:, :, 3] == 2).all() and (k[:, :, 4:] == 0).all()
    assert (v[:, :, 3] == 3).all()
    # gpt-fast's property: fixed addresses, so CUDA graphs can replay the step
    assert pointers == [t.data_ptr() for t in cache.key_cache + cache.value_cache]


def test_static_cache_default_position_crop_reset_advance(config):
    cache = StaticCache(config, max_batch_size=1, max_cache_len=6)
    for layer in range(config.num_hidden_layers):
        cache.update(*_kv(batch=1, length=4, fill=1), layer)  # no cache_position: after the stored ones
    assert cache.get_seq_length() == 4
    cache.crop(2)
    assert cache.get_seq_length() == 2
    assert (cache.key_cache[0][:, :, 2:] == 0).all(), "cropped slots are zeroed"
    assert (cache.key_cache[0][:, :, :2] == 1).all()
    cache.crop(-1)
    assert cache.get_seq_length() == 1
    cache.advance(3)  # what a compiled step's caller records
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="overflows"):
        cache.advance(3)
    cache.reset()
    assert cache.get_seq_length() == 0 and (cache.key_cache[0] == 0).all()


def test_static_cache_rejects_overflow_and_wrong_batch(config):
    cache = StaticCache(config, max_batch_size=2, max_cache_len=4)
    with pytest.raises(ValueError, match="overflows"):
        cache.update(*_kv(length=5), 0)
    with pytest.raises(ValueError, match="batch size 2"):
        cache.update(*_kv(batch=3, length=1), 0)
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticCache(config, max_batch_size=1, max_cache_len=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_forward_matches_uncached(attn, cache_kind):
    """Prefill 5 tokens, then 3 single-token steps through the model's own mask building: each
    step's logits equal the last row of a forward over the whole sequence without a cache."""
    hf = make_hf_model(tiny_config_dict(), attn_implementation=attn)
    model = make_port_model(hf, attn_implementation=attn)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    if cache_kind == "static":
        cache = StaticCache(model.config, max_batch_size=2, max_cache_len=12)
    else:
        cache = DynamicCache()
    worst = 0.0
    with torch.no_grad():
        logits = model(ids[:, :5], past_key_values=cache, use_cache=True).logits
        full = model(ids[:, :5]).logits
        worst = max(worst, (logits - full).abs().max().item())
        for t in range(5, 8):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            full = model(ids[:, : t + 1]).logits[:, -1]
            worst = max(worst, (step - full).abs().max().item())
    assert cache.get_seq_length() == 8
    assert report_max_diff(f"{cache_kind} cache vs no cache ({attn})", worst) <= 1e-5
