"""GGUF reader: tiny files written here with gguf's GGUFWriter, and the real SmolLM2-135M Q4_1 file.

The tiny files are written as llama.cpp's convert_hf_to_gguf.py writes them (conftest.py's
write_gguf: q/k rows permuted to the interleaved rotary layout by indexing, not names.py), then loaded and
compared with transformers: with the original model for F32 files, with transformers' own GGUF
loading (``from_pretrained(folder, gguf_file=...)``) for F16/BF16/quantized ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_port_model, make_hf_model, report_max_diff, tiny_config_dict, write_gguf

import llama_port
from llama_port.checkpoints.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
)
from llama_port.checkpoints.gguf import read_gguf_checkpoint

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TOL = 1e-5
# GGUF's quantized row blocks are 32 (Q8_0, Q4_x) wide, so every matrix dim must be a multiple of 32.
GGUF_TINY = dict(intermediate_size=128)


def load_transformers_gguf(path: Path):
    """transformers' own GGUF reader, through the one reference loader (llama_port.parity)."""
    from llama_port.parity import load_reference

    return load_reference(path, "float32", attn="eager")


def tokens(vocab: int, batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits.float() - b(ids).logits.float()).abs().max().item()


# ---------------------------------------------------------------------------------- tiny files
def test_f32_file_matches_transformers_model(tmp_path):
    hf_model = make_hf_model(tiny_config_dict(**GGUF_TINY))
    source = read_gguf_checkpoint(write_gguf(tmp_path / "tiny-f32.gguf", hf_model, Q.F32))
    cfg = source.config
    assert source.format == "gguf" and source.dtype == torch.float32 and source.tokenizer_files == []
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.rms_norm_eps == pytest.approx(1e-5) and cfg.max_position_embeddings == 64
    assert cfg.tie_word_embeddings is False

    # Every tensor comes back bit for bit in transformers' layout (the q/k permutation undone).
    expected = hf_model.state_dict()
    for group in source.iter_groups():
        for name, tensor in group.items():
            assert torch.equal(tensor, expected[name]), name

    diff = max_logit_diff(load_port_model(source, tied_head_may_be_missing=True), hf_model, tokens(128))
    assert report_max_diff("gguf F32 vs transformers model", diff) <= TOL


@pytest.mark.parametrize(
    "qtype, tied, dtype",
    [
        (Q.F16, False, torch.float16),
        (Q.BF16, False, torch.bfloat16),
        (Q.Q8_0, True, torch.float32),
        (Q.Q4_1, False, torch.float32),
    ],
    ids=["F16", "BF16", "Q8_0-tied", "Q4_1"],
)
def test_reduced_precision_files_match_transformers_gguf_loading(tmp_path, qtype, tied, dtype):
    hf_model = make_hf_model(tiny_config_dict(**GGUF_TINY, tie_word_embeddings=tied), seed=4)
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf_model, qtype, tied=tied)
    source = read_gguf_checkpoint(path)
    assert source.dtype == dtype and source.config.dtype == str(dtype).removeprefix("torch.")
    assert source.config.tie_word_embeddings is tied
    group = next(source.iter_groups())
    assert group["model.embed_tokens.weight"].dtype == dtype  # F16/BF16 kept as stored, quantized -> float32
    assert ("lm_head.weight" in group) is not tied

    ours = load_port_model(source, tied_head_may_be_missing=True)
    theirs = load_transformers_gguf(path)
    ids = tokens(128)
    diff = max_logit_diff(ours, theirs, ids)
    assert report_max_diff(f"gguf {qtype.name} vs transformers' GGUF loading", diff) <= TOL
    # And the quantization error itself is visible but small against the unquantized model.
    quantization_error = max_logit_diff(ours, hf_model, ids)
    report_max_diff(f"gguf {qtype.name} vs unquantized transformers model (quantization error)", quantization_error)


def llama_cpp_rope_freqs(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """convert_hf_to_gguf.py's generate_extra_tensors for rope_type llama3: per-frequency divisors."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_freq_factor, high_freq_factor, old_context_len = 1.0, 4.0, 8192
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs_tensor_becomes_rope_parameters(tmp_path):
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    config = tiny_config_dict(**GGUF_TINY, rope_parameters=rope, max_position_embeddings=131072)
    hf_model = make_hf_model(config, seed=6)
    freqs = llama_cpp_rope_freqs(500000.0, 16, 32.0)
    path = write_gguf(tmp_path / "llama31.gguf", hf_model, Q.F32, extra_tensors={"rope_freqs.weight": freqs})
    source = read_gguf_checkpoint(path)
    assert source.config.rope_parameters == rope
    assert all("rope_freqs" not in name for group in source.iter_groups() for name in group)
    diff = max_logit_diff(load_port_model(source, tied_head_may_be_missing=True), hf_model, tokens(128))
    assert report_max_diff("gguf llama3 rope_freqs vs transformers model", diff) <= TOL


def test_other_architecture_is_unsupported(tmp_path):
    hf_model = make_hf_model(tiny_config_dict(**GGUF_TINY))
    path = write_gguf(tmp_path / "not-llama.gguf", hf_model, Q.F32, architecture="gpt2")
    with pytest.raises(UnsupportedCheckpointError, match="general.architecture is 'gpt2'") as info:
        read_gguf_checkpoint(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_quant_type_gguf_cannot_dequantize_is_unsupported(tmp_path):
    """A real file with one Q8_1 tensor (a type llama.cpp uses only for activations; gguf has no
    dequantizer for it): the error names the tensor and the type."""
    hf_model = make_hf_model(tiny_config_dict(**GGUF_TINY))
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    head_bytes = np.zeros((128, 64 // block_size * type_size), dtype=np.uint8)  # a (V, C) = (128, 64) head
    path = write_gguf(
        tmp_path / "q8_1.gguf", hf_model, Q.F32, tied=True, raw_tensors={"output.weight": (head_bytes, Q.Q8_1)}
    )
    with pytest.raises(UnsupportedCheckpointError, match=r"'output.weight'.*Q8_1") as info:
        read_gguf_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_or_garbled_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nothing.gguf"):
        read_gguf_checkpoint(tmp_path / "nothing.gguf")
    garbled = tmp_path / "garbled.gguf"
    garbled.write_bytes(b"not a gguf file at all")
    with pytest.raises(CorruptCheckpointError, match="garbled.gguf"):
        read_gguf_checkpoint(garbled)


# ------------------------------------------------------------------------------ real SmolLM2 file
@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf):
    return read_gguf_checkpoint(smollm2_gguf)


def test_smollm2_config(smollm2_source, smollm2_gguf):
    cfg = smollm2_source.config
    assert smollm2_source.dtype == torch.float32  # Q4_1 matrices dequantize to float32
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size) == (576, 1536, 64, 49152)
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert cfg.max_position_embeddings == 8192 and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert smollm2_source.num_groups == 31 and smollm2_source.files == [smollm2_gguf]


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loading(smollm2_source, smollm2_gguf):
    ours = load_port_model(smollm2_source, tied_head_may_be_missing=True)
    theirs = load_transformers_gguf(smollm2_gguf)
    ids = tokens(49152, batch=1, length=24)
    diff = max_logit_diff(ours, theirs, ids)
    assert report_max_diff("SmolLM2-135M Q4_1 GGUF vs transformers' GGUF loading (fp32)", diff) <= 1e-4

    if _from_pretrained_reads_gguf():
        loaded = llama_port.LlamaForCausalLM.from_pretrained(
            smollm2_gguf, dtype=torch.float32, attn_implementation="eager"
        )
        diff = max_logit_diff(loaded.eval(), theirs, ids)
        assert report_max_diff("SmolLM2 via LlamaForCausalLM.from_pretrained vs transformers", diff) <= 1e-4


def _from_pretrained_reads_gguf() -> bool:
    """Whether the loader (written alongside this reader) is there yet."""
    try:
        from llama_port.checkpoints import loading  # noqa: F401
    except ImportError:
        return False
    return hasattr(llama_port.LlamaForCausalLM, "from_pretrained")
