"""RoPE inverse frequencies and attention scaling, per rope type, against transformers' own functions."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as HFRotary
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

from llama_port import LlamaConfig
from llama_port.modeling import LlamaRotaryEmbedding
from llama_port.rope import apply_rotary_pos_emb, compute_inv_freq

BASE = dict(hidden_size=512, num_attention_heads=4, max_position_embeddings=4096)  # head_dim 128
ROPE_CASES = {
    "default": {},
    "default_theta_500k": dict(rope_theta=500000.0),
    "linear": dict(rope_scaling={"type": "linear", "factor": 4.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
    "yarn_mscale": dict(rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                      "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}),
    "longrope": dict(rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 1024,
                                   "short_factor": [1.0 + i / 64 for i in range(64)],
                                   "long_factor": [2.0 + i / 16 for i in range(64)]}),
}
PRESETS = ["llama-2-7b", "llama-3-8b", "llama-3.1-8b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b"]


def _hf_inv_freq(config_dict, seq_len=None):
    hf_config = transformers.LlamaConfig(**config_dict)
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        return HFRotary.compute_default_rope_parameters(hf_config)
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, seq_len=seq_len)


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_inv_freq_and_scaling_bit_identical(case):
    config_dict = {**BASE, **ROPE_CASES[case]}
    ours, our_scale = compute_inv_freq(LlamaConfig(**config_dict))
    ref, ref_scale = _hf_inv_freq(config_dict)
    assert ours.dtype == torch.float32 and ours.shape == (64,)
    assert torch.equal(ours, ref), (ours - ref).abs().max()
    assert our_scale == ref_scale


@pytest.mark.parametrize("seq_len", [1000, 4096, 10000, 50000])
def test_dynamic_ntk_frequencies_grow_with_sequence(seq_len):
    config_dict = {**BASE, **ROPE_CASES["dynamic"]}
    ours, _ = compute_inv_freq(LlamaConfig(**config_dict), seq_len=torch.tensor(seq_len))
    ref, _ = _hf_inv_freq(config_dict, seq_len=torch.tensor(seq_len))
    assert torch.equal(ours, ref)
    trained, _ = compute_inv_freq(LlamaConfig(**config_dict))
    assert torch.equal(ours, trained) == (seq_len <= 4096)


def test_longrope_switches_to_long_factors_past_original_context():
    config = LlamaConfig(**{**BASE, **ROPE_CASES["longrope"]})
    short, scale = compute_inv_freq(config, seq_len=1024)
    long, _ = compute_inv_freq(config, seq_len=1025)
    ref_long, ref_scale = _hf_inv_freq({**BASE, **ROPE_CASES["longrope"]}, seq_len=1025)
    assert torch.equal(long, ref_long) and scale == ref_scale
    assert not torch.equal(short, long)


@pytest.mark.parametrize("preset", PRESETS)
def test_published_models_inv_freq(preset):
    """Llama 3.1's factor 8 and Llama 3.2's factor 32 included."""
    config = LlamaConfig.from_preset(preset)
    ours, _ = compute_inv_freq(config)
    ref, _ = _hf_inv_freq(config.to_dict())
    assert torch.equal(ours, ref)


def test_llama3_scaling_shape_of_the_curve():
    """High frequencies untouched, low ones divided by the factor, a blend between (Llama 3.2 3B vs 3 8B:
    both head_dim 128, theta 500000)."""
    plain, _ = compute_inv_freq(LlamaConfig.from_preset("llama-3-8b"))
    scaled, _ = compute_inv_freq(LlamaConfig.from_preset("llama-3.2-3b"))
    wavelen = 2 * torch.pi / plain
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 32)
    middle = ~high & ~low
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 32)).all()


@pytest.mark.parametrize("case", ["default", "yarn", "dynamic", "longrope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_module_cos_sin_match(case, dtype):
    config_dict = {**BASE, **ROPE_CASES[case]}
    ours = LlamaRotaryEmbedding(LlamaConfig(**config_dict))
    ref = HFRotary(transformers.LlamaConfig(**config_dict))
    x = torch.zeros(1, dtype=dtype)
    for positions in (torch.arange(0, 16)[None], torch.arange(5000, 5016)[None], torch.arange(8)[None]):
        (c1, s1), (c2, s2) = ours(x, positions), ref(x, positions)
        assert c1.dtype == dtype
        assert torch.equal(c1, c2) and torch.equal(s1, s2), (case, positions[0, 0].item())


def test_apply_rotary_pos_emb_matches_and_preserves_norm():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6, 32), torch.randn(2, 2, 6, 32)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=128, num_attention_heads=4))
    cos, sin = rotary(q, torch.arange(6)[None].expand(2, -1))
    ours = apply_rotary_pos_emb(q, k, cos, sin)
    ref = hf_apply(q, k, cos, sin)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[0].norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths
