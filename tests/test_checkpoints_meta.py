"""Meta's params.json + consolidated.NN.pth reader, against transformers and against Meta's own math.

The Meta checkpoints are written from tiny transformers models by a conversion written in the
tests (conftest.py's write_meta_checkpoint: row indexing, not names.py's reshapes), so the reader
is not checked against itself.
A second reference is Meta's reference forward pass, complex-number RoPE included, run on the raw
Meta tensors: it proves the q/k permutation by something other than a round trip.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    load_port_model,
    make_hf_model,
    meta_state_dict,
    report_max_diff,
    tiny_config_dict,
    write_meta_checkpoint,
)

import llama_port
from llama_port.checkpoints.errors import CheckpointNotFoundError, ShapeMismatchError
from llama_port.checkpoints.meta import meta_ffn_hidden_dim, read_meta_checkpoint

TOL = 1e-5


# --------------------------------------------------------------------- Meta's reference forward
def meta_precompute_freqs_cis(dim: int, end: int, theta: float, use_scaled: bool, scale_factor: float) -> torch.Tensor:
    """Meta's llama/model.py: complex e^{i t f} for t < end, f the (scaled) frequencies."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if use_scaled:
        freqs = meta_apply_scaling(freqs, scale_factor)
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # (T, D/2) complex64


def meta_apply_scaling(freqs: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Llama 3.1's apply_scaling, loop for loop as Meta wrote it."""
    low_freq_factor, high_freq_factor, old_context_len = 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


def meta_apply_rotary_emb(xq, xk, freqs_cis):
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... as complex numbers: Meta's interleaved layout."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, T, H, D/2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def meta_forward(state: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's Transformer.forward (start_pos 0, no cache) on Meta-layout tensors -> logits (B, T, V)."""
    dim, n_heads, eps = params["dim"], params["n_heads"], params["norm_eps"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    B, T = tokens.shape

    def rms_norm(x, weight):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight

    freqs_cis = meta_precompute_freqs_cis(
        head_dim, T, params.get("rope_theta", 10000.0), params.get("use_scaled_rope", False),
        params.get("rope_scaling_factor", 8.0),
    )
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    h = state["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, state[p + "attention_norm.weight"])
        xq = (x @ state[p + "attention.wq.weight"].T).view(B, T, n_heads, head_dim)
        xk = (x @ state[p + "attention.wk.weight"].T).view(B, T, n_kv, head_dim)
        xv = (x @ state[p + "attention.wv.weight"].T).view(B, T, n_kv, head_dim)
        xq, xk = meta_apply_rotary_emb(xq, xk, freqs_cis)
        xk = xk.repeat_interleave(n_heads // n_kv, dim=2)  # repeat_kv
        xv = xv.repeat_interleave(n_heads // n_kv, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (B, H, T, D)
        scores = q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask
        out = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        h = h + out.transpose(1, 2).reshape(B, T, -1) @ state[p + "attention.wo.weight"].T
        x = rms_norm(h, state[p + "ffn_norm.weight"])
        ffn = F.silu(x @ state[p + "feed_forward.w1.weight"].T) * (x @ state[p + "feed_forward.w3.weight"].T)
        h = h + ffn @ state[p + "feed_forward.w2.weight"].T
    return rms_norm(h, state["norm.weight"]) @ state["output.weight"].T


# ------------------------------------------------------------------------------------ cases
def params_and_hf_config(kind: str) -> tuple[dict, dict]:
    """(params.json, matching transformers config dict) for a named tiny case."""
    dim, n_heads = 64, 4
    if kind == "llama2-mha":  # no n_kv_heads: multi-head attention, Llama 2's theta
        params = dict(dim=dim, n_layers=2, n_heads=n_heads, vocab_size=-1, multiple_of=16, norm_eps=1e-5,
                      rope_theta=10000.0)
        hf = dict(num_key_value_heads=n_heads, rope_theta=10000.0, max_position_embeddings=4096)
    elif kind == "gqa-ffn-multiplier":
        params = dict(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=2, vocab_size=-1, multiple_of=32,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)
        hf = dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=8192)
    elif kind in ("scaled-rope", "scaled-rope-32"):
        factor = 32.0 if kind == "scaled-rope-32" else 8.0
        params = dict(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=1, vocab_size=128, multiple_of=16,
                      ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
        if kind == "scaled-rope-32":
            params["rope_scaling_factor"] = factor
        hf = dict(num_key_value_heads=1, max_position_embeddings=131072,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192))
    else:
        raise AssertionError(kind)
    hf["intermediate_size"] = meta_ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    return params, tiny_config_dict(hidden_size=dim, num_attention_heads=n_heads, rms_norm_eps=1e-5, **hf)


def tokens(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(1))


def test_ffn_hidden_dim_matches_published_models():
    assert meta_ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert meta_ffn_hidden_dim(5120, 256, None) == 13824  # Llama 2 13B
    assert meta_ffn_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert meta_ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert meta_ffn_hidden_dim(2048, 256, 1.5) == 8192  # Llama 3.2 1B


@pytest.mark.parametrize("kind", ["llama2-mha", "gqa-ffn-multiplier", "scaled-rope", "scaled-rope-32"])
def test_single_file_matches_transformers_and_meta_reference(tmp_path, kind):
    params, hf_config = params_and_hf_config(kind)
    hf_model = make_hf_model(hf_config)
    folder = write_meta_checkpoint(tmp_path / "meta", hf_model, params)

    source = read_meta_checkpoint(folder)
    cfg = source.config
    assert source.format == "meta" and source.num_groups == params["n_layers"] + 1
    assert source.dtype == torch.float32 and cfg.dtype == "float32"
    assert cfg.vocab_size == 128 and cfg.hidden_size == 64 and cfg.intermediate_size == hf_config["intermediate_size"]
    assert cfg.num_key_value_heads == hf_config["num_key_value_heads"]
    assert cfg.max_position_embeddings == hf_config["max_position_embeddings"]
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-5
    if "rope_parameters" in hf_config:
        assert cfg.rope_parameters == hf_config["rope_parameters"]
    else:
        assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": params["rope_theta"]}

    model = load_port_model(source)
    ids = tokens()
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf_model(ids).logits
        meta = meta_forward(meta_state_dict(hf_model), params, ids)
    assert report_max_diff(f"meta {kind} vs transformers", (ours - theirs).abs().max().item()) <= TOL
    assert report_max_diff(f"meta {kind} vs Meta complex-RoPE reference", (ours - meta).abs().max().item()) <= TOL


@pytest.mark.parametrize("vocab_split", [False, True], ids=["llama2-embedding-split", "llama3-vocab-split"])
def test_model_parallel_shards_merge(tmp_path, vocab_split):
    params, hf_config = params_and_hf_config("gqa-ffn-multiplier")
    hf_model = make_hf_model(hf_config, seed=3)
    folder = write_meta_checkpoint(tmp_path / "mp", hf_model, params, ranks=2, vocab_parallel_embedding=vocab_split)
    assert sorted(p.name for p in folder.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]

    source = read_meta_checkpoint(folder)
    assert source.config.vocab_size == 128 and source.config.intermediate_size == hf_config["intermediate_size"]
    groups = list(source.iter_groups())
    assert len(groups) == source.num_groups == 3
    assert set(groups[0]) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert all(name.startswith(f"model.layers.{i}.") for i, g in enumerate(groups[1:]) for name in g)

    expected = hf_model.state_dict()
    for group in groups:
        for name, tensor in group.items():
            assert torch.equal(tensor, expected[name]), name

    model = load_port_model(source)
    ids = tokens()
    with torch.no_grad():
        diff = (model(ids).logits - hf_model(ids).logits).abs().max().item()
    split = "vocab" if vocab_split else "dim"
    assert report_max_diff(f"meta 2-rank ({split} split) vs transformers", diff) <= TOL

    # Through the loader (llama_port.checkpoints.loading), when it is there.
    if hasattr(llama_port.LlamaForCausalLM, "from_pretrained"):
        loaded = llama_port.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            diff = (loaded.eval()(ids).logits - hf_model(ids).logits).abs().max().item()
        assert report_max_diff(f"meta 2-rank ({split} split) via from_pretrained vs transformers", diff) <= TOL


def test_original_subfolder_layout(tmp_path):
    params, hf_config = params_and_hf_config("scaled-rope")
    hf_model = make_hf_model(hf_config, seed=5)
    repo = tmp_path / "Llama-3.1-tiny"
    write_meta_checkpoint(repo / "original", hf_model, params)
    (repo / "config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": [8, 9]}))
    (repo / "tokenizer.json").write_text("{}")
    (repo / "tokenizer_config.json").write_text("{}")

    for path in (repo, repo / "original", repo / "original" / "params.json"):
        source = read_meta_checkpoint(path)
        assert source.root == repo / "original"
        assert source.config.bos_token_id == 7 and source.config.eos_token_id == [8, 9]
        assert source.tokenizer_files == [repo / "tokenizer.json", repo / "tokenizer_config.json"]

    model = load_port_model(read_meta_checkpoint(repo))
    ids = tokens()
    with torch.no_grad():
        diff = (model(ids).logits - hf_model(ids).logits).abs().max().item()
    assert report_max_diff("meta original/ layout vs transformers", diff) <= TOL


def test_bfloat16_checkpoint_reports_its_dtype(tmp_path):
    params, hf_config = params_and_hf_config("llama2-mha")
    hf_model = make_hf_model(hf_config, dtype=torch.bfloat16)
    source = read_meta_checkpoint(write_meta_checkpoint(tmp_path / "bf16", hf_model, params))
    assert source.dtype == torch.bfloat16 and source.config.dtype == "bfloat16"
    assert source.config.bos_token_id == 1 and source.config.eos_token_id == 2  # Llama 1/2 ids for a small vocab
    group = next(source.iter_groups())
    assert group["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_missing_params_json_names_the_folder(tmp_path):
    folder = tmp_path / "no-params"
    folder.mkdir()
    torch.save({}, folder / "consolidated.00.pth")
    with pytest.raises(CheckpointNotFoundError, match="params.json") as info:
        read_meta_checkpoint(folder)
    assert str(folder) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_params_disagreeing_with_tensors_is_a_shape_mismatch(tmp_path):
    params, hf_config = params_and_hf_config("llama2-mha")
    hf_model = make_hf_model(hf_config)
    folder = write_meta_checkpoint(tmp_path / "bad", hf_model, {**params, "multiple_of": 256})
    with pytest.raises(ShapeMismatchError, match="feed_forward.w1"):
        read_meta_checkpoint(folder)
