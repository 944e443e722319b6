"""Our LlamaForCausalLM against transformers', on a matrix of tiny models, bit for bit where possible.

Bar: max |diff| <= 1e-5 in float32 (logits, every hidden state, loss, gradients); the target, and
what these tests see, is 0.0. Each test prints the largest difference it saw.
"""

from __future__ import annotations

import pytest
import torch

import llama_port
from conftest import TINY_MATRIX as CONFIGS
from conftest import make_hf_model, make_port_model, report_max_diff, tiny_config_dict

ATOL = 1e-5
SEQ_LEN = 12  # past max_position_embeddings=8 (dynamic) and original 8 (longrope's long factors)


def _inputs(padding: str, vocab: int = 128, batch: int = 3, seq: int = SEQ_LEN):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "left":
        mask[0, :4] = 0
        mask[1, :1] = 0
    elif padding == "right":
        mask[0, -4:] = 0
        mask[2, -2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, (None if padding == "none" else mask), labels, mask.bool()


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_hidden_states_and_loss_match(name, attn, padding):
    hf = make_hf_model(tiny_config_dict(**CONFIGS[name]), attn_implementation=attn)
    ours = make_port_model(hf, attn_implementation=attn)
    ids, mask, labels, real = _inputs(padding)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False)
        out = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False)

    assert out.logits.shape == ref.logits.shape
    assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    diffs = [(out.logits - ref.logits)[real].abs().max().item(), (out.loss - ref.loss).abs().item()]
    diffs += [(a - b)[real].abs().max().item() for a, b in zip(out.hidden_states, ref.hidden_states)]
    assert report_max_diff(f"{name}/{attn}/{padding}", max(diffs)) <= ATOL


def test_dynamic_rope_really_grows_past_max_position_embeddings():
    """The dynamic case above must exercise the grown frequencies, not the trained ones."""
    config = llama_port.LlamaConfig(**tiny_config_dict(**CONFIGS["rope_dynamic_past_max"]))
    rotary = llama_port.modeling.LlamaRotaryEmbedding(config)
    before = rotary.inv_freq.clone()
    rotary(torch.zeros(1, dtype=torch.float32), torch.arange(SEQ_LEN)[None])
    assert not torch.equal(before, rotary.inv_freq)
    rotary(torch.zeros(1, dtype=torch.float32), torch.arange(4)[None])  # short again: back to the original
    assert torch.equal(before, rotary.inv_freq)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_documents_attend_within_themselves(attn):
    """position_ids restarting at 0 mark packed documents; transformers masks across them too."""
    hf = make_hf_model(tiny_config_dict(), attn_implementation=attn)
    ours = make_port_model(hf, attn_implementation=attn)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        ref = hf(ids, position_ids=position_ids, use_cache=False).logits
        out = ours(ids, position_ids=position_ids, use_cache=False).logits
        alone = ours(ids[:, 4:7], use_cache=False).logits  # the second document on its own
    assert report_max_diff(f"packed/{attn}", (out - ref).abs().max().item()) <= ATOL
    assert (out[:, 4:7] - alone).abs().max().item() <= ATOL


def test_attention_weights_match_eager():
    hf = make_hf_model(tiny_config_dict(), attn_implementation="eager")
    ours = make_port_model(hf, attn_implementation="eager")
    ids, mask, _, _ = _inputs("left")
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions
        out = ours(ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions
    assert len(out) == len(ref) == 2
    diff = max((a - b).abs().max().item() for a, b in zip(out, ref))
    assert report_max_diff("attentions", diff) <= ATOL


def test_output_attentions_needs_eager():
    hf = make_hf_model(tiny_config_dict())
    ours = make_port_model(hf, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        ours(torch.ones(1, 3, dtype=torch.long), output_attentions=True)


def test_inputs_embeds_and_logits_to_keep():
    hf = make_hf_model(tiny_config_dict(), attn_implementation="sdpa")
    ours = make_port_model(hf, attn_implementation="sdpa")
    ids, _, _, _ = _inputs("none")
    embeds = ours.get_input_embeddings()(ids)
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, logits_to_keep=3).logits
        out = ours(inputs_embeds=embeds, logits_to_keep=3).logits
        positions = ours(ids, logits_to_keep=torch.tensor([0, 5])).logits
        full = ours(ids).logits
    assert out.shape == (3, 3, 128)
    assert report_max_diff("inputs_embeds", (out - ref).abs().max().item()) <= ATOL
    torch.testing.assert_close(positions, full[:, [0, 5]], rtol=0, atol=1e-6)  # lm_head on 2 rows vs 12
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ours(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ours()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_forward_matches_full_forward_and_transformers(attn):
    hf = make_hf_model(tiny_config_dict(), attn_implementation=attn)
    ours = make_port_model(hf, attn_implementation=attn)
    ids, mask, _, _ = _inputs("left")
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each row's first token
        prefix = ours(ids[:, :-2], attention_mask=mask[:, :-2], position_ids=position_ids[:, :-2], use_cache=True)
        cache = prefix.past_key_values
        assert cache.get_seq_length() == SEQ_LEN - 2
        step = ours(ids[:, -2:], attention_mask=mask, past_key_values=cache, position_ids=position_ids[:, -2:])
        full = ours(ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        ref = hf(ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    real = mask[:, -2:].bool()
    diff = (step.logits - full.logits[:, -2:])[real].abs().max().item()
    assert report_max_diff(f"cached/{attn}", diff) <= ATOL
    assert (full.logits - ref.logits)[mask.bool()].abs().max().item() <= ATOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gradients_match(attn):
    hf = make_hf_model(tiny_config_dict(attention_bias=True), attn_implementation=attn)
    ours = make_port_model(hf, attn_implementation=attn)
    hf.train()
    ours.train()
    ids, mask, labels, _ = _inputs("left")
    hf(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    ours(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    ref_grads = dict(hf.named_parameters())
    worst = 0.0
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        worst = max(worst, (param.grad - ref_grads[name].grad).abs().max().item())
    assert report_max_diff(f"gradients/{attn}", worst) <= ATOL


def test_gradient_checkpointing_gives_the_same_gradients():
    hf = make_hf_model(tiny_config_dict())
    plain = make_port_model(hf, attn_implementation="sdpa").train()
    checkpointed = make_port_model(hf, attn_implementation="sdpa").train()
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    ids, mask, labels, _ = _inputs("right")
    plain(ids, attention_mask=mask, labels=labels).loss.backward()
    checkpointed(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bfloat16_error_within_transformers_own(attn):
    """Our bf16 logits' error against transformers' fp32 is at most 1.5x transformers' own bf16 error."""
    hf32 = make_hf_model(tiny_config_dict(), attn_implementation=attn)
    hf16 = make_hf_model(tiny_config_dict(), attn_implementation=attn, dtype=torch.bfloat16)
    ours16 = make_port_model(hf32, attn_implementation=attn, dtype=torch.bfloat16)
    ids, mask, _, real = _inputs("left")
    with torch.no_grad():
        ref32 = hf32(ids, attention_mask=mask).logits
        ref_err = (hf16(ids, attention_mask=mask).logits.float() - ref32)[real].abs().max().item()
        our_err = (ours16(ids, attention_mask=mask).logits.float() - ref32)[real].abs().max().item()
    print(f"[parity] bf16/{attn}: ours {our_err:.4e}, transformers {ref_err:.4e}")
    assert ref_err > 0  # the yardstick is real
    assert our_err <= 1.5 * ref_err


def test_rotary_angles_are_float32_under_bf16_and_autocast():
    """cos/sin are computed in float32 (then cast), not in the weights' dtype."""
    config = llama_port.LlamaConfig(**tiny_config_dict(max_position_embeddings=4096))
    rotary = llama_port.modeling.LlamaRotaryEmbedding(config)
    positions = torch.arange(4000, 4008)[None]
    cos32, _ = rotary(torch.zeros(1, dtype=torch.float32), positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos16, _ = rotary(torch.zeros(1, dtype=torch.bfloat16), positions)
    assert cos16.dtype == torch.bfloat16
    torch.testing.assert_close(cos16, cos32.to(torch.bfloat16), rtol=0, atol=0)


def test_attn_implementation_switch_and_unknown_name():
    hf = make_hf_model(tiny_config_dict())
    ours = make_port_model(hf, attn_implementation="eager")
    ids, mask, _, real = _inputs("right")
    with torch.no_grad():
        eager = ours(ids, attention_mask=mask).logits
        ours.set_attn_implementation("sdpa")
        assert ours.attn_implementation == "sdpa"
        assert all(layer.self_attn.backend.name == "sdpa" for layer in ours.model.layers)
        sdpa = ours(ids, attention_mask=mask).logits
    assert (eager - sdpa)[real].abs().max().item() <= ATOL
    with pytest.raises(ValueError, match=r"attn_implementation='nope'; expected one of \[.*'eager'.*'sdpa'"):
        ours.set_attn_implementation("nope")
    with pytest.raises(ValueError, match="attn_implementation='nope'"):
        llama_port.LlamaForCausalLM(ours.config, attn_implementation="nope")


def test_tied_embeddings_share_one_tensor_and_parameter_counts():
    config = llama_port.LlamaConfig(**tiny_config_dict(tie_word_embeddings=True))
    model = llama_port.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_config_dict(tie_word_embeddings=True)))
    assert model.num_parameters() == hf.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)


def test_weight_init_statistics_follow_transformers():
    config = llama_port.LlamaConfig(**tiny_config_dict(hidden_size=256, intermediate_size=512, initializer_range=0.02))
    model = llama_port.LlamaForCausalLM(config)
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(256))
    assert torch.equal(model.model.embed_tokens.weight[config.pad_token_id], torch.zeros(256))


def test_bare_llama_model_loads_transformers_llama_model():
    import transformers

    hf = make_hf_model(tiny_config_dict(), attn_implementation="sdpa").model  # transformers' LlamaModel
    ours = llama_port.LlamaModel(llama_port.LlamaConfig(**tiny_config_dict()), attn_implementation="sdpa").eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert isinstance(hf, transformers.LlamaModel)
    ids, mask, _, real = _inputs("left")
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        out = ours(ids, attention_mask=mask).last_hidden_state
    assert report_max_diff("LlamaModel", (out - ref)[real].abs().max().item()) <= ATOL


def test_rotary_frequencies_stay_float32_after_casting_the_model():
    model = llama_port.LlamaForCausalLM(llama_port.LlamaConfig(**tiny_config_dict()))
    expected = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, expected)
    assert model.lm_head.weight.dtype == torch.bfloat16
