"""The whole flash_attention_2 code path on CPU, through the pure-PyTorch reference kernels.

``attn_implementation="flash_reference"`` runs the same adapter as flash_attention_2 (unpadding,
varlen, packing, decode) with our FlashAttention-2 kernels, so every test here is also a test of
what runs on a GPU with flash-attn. Everything is compared with sdpa in float32.
"""

from __future__ import annotations

import pytest
import torch

import llama_port
from conftest import make_hf_model, make_port_model, report_max_diff, tiny_config_dict

ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model(tiny_config_dict(num_hidden_layers=3), attn_implementation="sdpa")
    return make_port_model(hf, "flash_reference"), make_port_model(hf, "sdpa"), hf


def _batch(padding: str):
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :5] = 0
        mask[2, :2] = 0
    elif padding == "right":
        mask[1, -3:] = 0
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_padded_batches_match_sdpa(models, padding):
    flash, sdpa, hf = models
    ids, mask = _batch(padding)
    with torch.no_grad():
        a = flash(ids, attention_mask=mask, use_cache=False).logits
        b = sdpa(ids, attention_mask=mask, use_cache=False).logits
        ref = hf(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert report_max_diff(f"flash_reference/{padding} vs sdpa", (a - b)[real].abs().max().item()) <= ATOL
    assert (a - ref)[real].abs().max().item() <= ATOL


def test_packed_row_equals_each_document_alone(models):
    flash, sdpa, _ = models
    lengths = [4, 6, 3]
    docs = [torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(10 + n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        out = flash(packed, position_ids=position_ids, use_cache=False).logits
        via_sdpa = sdpa(packed, position_ids=position_ids, use_cache=False).logits
        worst, start = 0.0, 0
        for doc, n in zip(docs, lengths):
            alone = flash(doc, use_cache=False).logits
            worst = max(worst, (out[:, start : start + n] - alone).abs().max().item())
            start += n
    assert report_max_diff("packed row vs documents alone", worst) <= ATOL
    assert (out - via_sdpa).abs().max().item() <= ATOL


def test_packed_rows_in_a_batch(models):
    """Two packed rows: documents never cross a row boundary either."""
    flash, sdpa, _ = models
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    with torch.no_grad():
        a = flash(ids, position_ids=position_ids, use_cache=False).logits
        b = sdpa(ids, position_ids=position_ids, use_cache=False).logits
    assert report_max_diff("two packed rows", (a - b).abs().max().item()) <= ATOL


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_cached_decoding_matches_sdpa(models, cache_kind, padding):
    flash, sdpa, _ = models
    ids, mask = _batch(padding)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt, steps = 6, ids.shape[1] - 6
    results = []
    for model in (flash, sdpa):
        if cache_kind == "static":
            cache = llama_port.StaticCache(model.config, max_batch_size=3, max_cache_len=16)
        else:
            cache = llama_port.DynamicCache()
        logits = []
        with torch.no_grad():
            out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=position_ids[:, :prompt],
                        past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            for t in range(prompt, prompt + steps):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=position_ids[:, t : t + 1],
                            past_key_values=cache, use_cache=True)
                logits.append(out.logits)
        results.append(torch.cat(logits, dim=1))
    real = mask.bool()
    diff = (results[0] - results[1])[real].abs().max().item()
    assert report_max_diff(f"decode {cache_kind}/{padding}", diff) <= ATOL


def test_flash_attention_2_unavailable_is_a_clear_error_at_build_time():
    if torch.cuda.is_available():
        pytest.skip("this machine may run flash_attn")
    config = llama_port.LlamaConfig(**tiny_config_dict())
    with pytest.raises(ImportError, match="(flash-attn --no-build-isolation|CUDA)"):
        llama_port.LlamaForCausalLM(config, attn_implementation="flash_attention_2")


def test_default_backend_is_sdpa_on_cpu():
    model = llama_port.LlamaForCausalLM(llama_port.LlamaConfig(**tiny_config_dict()))
    assert model.attn_implementation == "sdpa"


@pytest.mark.gpu
def test_flash_attention_2_on_gpu_matches_sdpa_in_bf16():
    pytest.importorskip("flash_attn")
    hf = make_hf_model(tiny_config_dict(num_hidden_layers=3))
    flash = make_port_model(hf, "sdpa").to("cuda", torch.bfloat16)
    flash.set_attn_implementation("flash_attention_2")
    sdpa = make_port_model(hf, "sdpa").to("cuda", torch.bfloat16)
    ids, mask = _batch("left")
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        a = flash(ids, attention_mask=mask).logits.float()
        b = sdpa(ids, attention_mask=mask).logits.float()
    assert report_max_diff("flash_attention_2 vs sdpa bf16", (a - b)[mask.bool()].abs().max().item()) <= 5e-2
