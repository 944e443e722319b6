"""The parity tool: compare() on tiny models (it passes twins, and names the layer a planted bug is
in), the bf16 ratio rule, first_divergent's rule and random_batch's padding. The parity command
(exit codes, JSON, plot, the end-to-end run on SmolLM2) is tested in test_cli.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llama_port.modeling import LlamaRotaryEmbedding
from llama_port.parity import LayerDiff, compare, first_divergent, left_pad, random_batch

from conftest import (
    JSON_KEYS,
    NUM_LAYERS,
    make_hf_model,
    make_port_model,
    make_tiny_pair,
    report_max_diff,
    tiny_config_dict,
)


def tiny_batch(vocab_size: int = 128, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded rows of 16, each padded differently."""
    return left_pad(random_batch(vocab_size, batch=3, seq_len=16, pad_token_id=pad), pad, 16)


# ------------------------------------------------------------------------------------ compare()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_twins_pass(attn):
    ours, reference = make_tiny_pair(attn, num_hidden_layers=NUM_LAYERS)
    input_ids, attention_mask = tiny_batch()
    report = compare(ours, reference, input_ids, attention_mask, max_new_tokens=8)
    report_max_diff(f"tiny twins {attn}", report.max_abs_diff)
    assert report.passed, report.failures
    assert report.max_abs_diff <= 1e-4 and report.kl_max <= 1e-9
    assert report.top1_agreement == report.top5_agreement == 1.0
    assert report.first_divergent_layer is None and report.first_divergent_name is None
    assert report.greedy_match and report.first_token_mismatch is None
    assert report.ours_tokens == report.reference_tokens and len(report.ours_tokens) >= 1
    assert report.num_positions == int(attention_mask.sum())
    names = [e.name for e in report.per_layer]
    assert names == ["embed_tokens", *[f"layers.{i}" for i in range(NUM_LAYERS)], "norm", "lm_head"]
    assert (report.dtype, report.device, report.backend) == ("float32", "cpu", attn)
    assert JSON_KEYS <= set(report.to_dict())


@pytest.mark.parametrize("layer", [0, 2, NUM_LAYERS - 1])
@pytest.mark.parametrize(
    "param", ["mlp.down_proj.weight", "self_attn.k_proj.weight", "post_attention_layernorm.weight"]
)
def test_perturbed_weight_names_its_layer(layer, param):
    ours, reference = make_tiny_pair("sdpa", num_hidden_layers=NUM_LAYERS)
    with torch.no_grad():
        ours.get_parameter(f"model.layers.{layer}.{param}").view(-1)[3] += 0.5  # one element
    report = compare(ours, reference, *tiny_batch(), max_new_tokens=0)
    assert not report.passed
    assert report.first_divergent_layer == layer, [(e.name, e.max_abs_diff) for e in report.per_layer]
    assert report.first_divergent_name == f"layers.{layer}"
    before = [e.max_abs_diff for e in report.per_layer[: layer + 1]]
    assert max(before) <= 1e-5  # embed_tokens .. layers.{layer - 1} still agree


def test_rope_theta_change_diverges_at_layer_0():
    ours, reference = make_tiny_pair("eager", num_hidden_layers=NUM_LAYERS)
    ours.config.rope_parameters["rope_theta"] = 500.0
    ours.model.rotary_emb = LlamaRotaryEmbedding(ours.config)  # frequencies from the changed theta
    report = compare(ours, reference, *tiny_batch(), max_new_tokens=8, allow_token_mismatch=True)
    assert not report.passed
    assert report.per_layer[0].max_abs_diff == 0.0  # the embedding does not see RoPE
    assert report.first_divergent_layer == 0 and report.first_divergent_name == "layers.0"
    assert report.kl_max > 1e-6 and report.max_abs_diff > 1e-3


def test_lm_head_bug_is_named_lm_head():
    ours, reference = make_tiny_pair("eager", num_hidden_layers=NUM_LAYERS)
    with torch.no_grad():
        ours.lm_head.weight[5, 0] += 1.0
    report = compare(ours, reference, *tiny_batch(), max_new_tokens=0)
    assert not report.passed
    assert report.first_divergent_layer is None and report.first_divergent_name == "lm_head"


def test_greedy_mismatch_fails_unless_allowed():
    ours, reference = make_tiny_pair("eager", num_hidden_layers=NUM_LAYERS)
    with torch.no_grad():
        ours.lm_head.weight.mul_(-1.0)  # a different argmax everywhere
    prompt = torch.tensor([[5, 17, 33, 9]])
    strict = compare(ours, reference, prompt, max_new_tokens=4, atol=1e9)
    assert strict.greedy_match is False and strict.first_token_mismatch == 0
    assert not strict.passed and "greedy" in strict.failures[0]
    lenient = compare(ours, reference, prompt, max_new_tokens=4, atol=1e9, allow_token_mismatch=True)
    assert lenient.passed and lenient.greedy_match is False


def test_bfloat16_ratio_rule():
    reference_fp32 = make_hf_model(tiny_config_dict(num_hidden_layers=NUM_LAYERS), "sdpa")
    reference = copy.deepcopy(reference_fp32).to(torch.bfloat16)
    ours = make_port_model(reference_fp32, "sdpa", dtype=torch.bfloat16)
    input_ids, attention_mask = tiny_batch()
    report = compare(ours, reference, input_ids, attention_mask, max_new_tokens=8, reference_fp32=reference_fp32)
    print(f"[parity] bf16: ours vs fp32 {report.ours_error:.3e}, reference vs fp32 {report.reference_error:.3e}")
    assert report.dtype == "bfloat16" and report.ratio == 2.0 and report.atol is None
    assert report.reference_error > 0 and report.ours_error > 0  # both errors are measured and reported
    assert report.ours_error <= 2.0 * report.reference_error
    assert report.passed, report.failures
    assert report.to_dict()["ours_error"] == report.ours_error

    # A planted bug is still found in bf16: per-layer thresholds are 2x the reference's own error.
    with torch.no_grad():
        ours.model.layers[1].mlp.down_proj.weight[0, 0] += 2.0
    broken = compare(ours, reference, input_ids, attention_mask, max_new_tokens=0, reference_fp32=reference_fp32)
    assert not broken.passed and broken.first_divergent_layer == 1


def test_low_precision_needs_a_yardstick():
    ours, reference = make_tiny_pair("eager", dtype=torch.bfloat16, num_hidden_layers=NUM_LAYERS)
    with pytest.raises(ValueError, match="reference_fp32"):
        compare(ours, reference, torch.tensor([[3, 4, 5]]), max_new_tokens=0)


def test_first_divergent_rule():
    def entries(values, threshold=1e-4):
        return [LayerDiff(i, f"layers.{i}", v, v, threshold) for i, v in enumerate(values)]

    assert first_divergent(entries([0.0, 1e-6, 2e-6])) is None  # all under the threshold
    assert first_divergent(entries([0.0, 0.0, 3e-3, 5e-2])).layer == 2  # from exactly 0
    assert first_divergent(entries([1e-6, 2e-6, 5e-5, 9e-3, 1.0])).layer == 3  # 5e-5 is noise, then a jump
    assert first_divergent(entries([2e-4, 3e-4, 5e-4])).layer == 0  # over from the start
    assert first_divergent(entries([5e-5, 2e-4, 3e-4, 5e-4], 1e-4)).layer == 1  # gradual: first over
    assert first_divergent(entries([0.0, math.nan])).layer == 1


def test_random_batch_pads_rows_differently_and_is_seeded():
    rows = random_batch(100, batch=4, seq_len=10, pad_token_id=0)
    lengths = [len(r) for r in rows]
    assert len(set(lengths)) == 4 and min(lengths) >= 5 and max(lengths) <= 10
    assert all(torch.equal(a, b) for a, b in zip(rows, random_batch(100, 4, 10, 0)))
    input_ids, attention_mask = left_pad(rows, pad_token_id=0, length=12)
    assert input_ids.shape == (4, 12) and attention_mask.sum(-1).tolist() == lengths
    assert (attention_mask[:, -1] == 1).all()  # left padding: the last column is real
