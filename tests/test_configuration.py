"""LlamaConfig: transformers' fields, every rope spelling found on the Hub, round trips, clear errors."""

from __future__ import annotations

import json

import pytest
import transformers

import llama_port
from llama_port import LlamaConfig

# config.json as published on the Hub (abridged to the fields that matter), one per rope spelling.
LLAMA2_7B_HUB = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA31_8B_INSTRUCT_HUB = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
CODELLAMA_LINEAR_TYPE_KEY = dict(LLAMA2_7B_HUB, rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=1000000)
TRANSFORMERS5_STYLE = dict(
    LLAMA2_7B_HUB,
    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 20000.0},
    dtype="bfloat16",
)
TRANSFORMERS5_STYLE.pop("rope_scaling")
TRANSFORMERS5_STYLE.pop("torch_dtype")

HUB_CONFIGS = {
    "llama2_rope_null": LLAMA2_7B_HUB,
    "llama31_rope_type": LLAMA31_8B_INSTRUCT_HUB,
    "legacy_type_key": CODELLAMA_LINEAR_TYPE_KEY,
    "transformers5": TRANSFORMERS5_STYLE,
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_reads_hub_configs_as_transformers_does(name):
    raw = HUB_CONFIGS[name]
    ours = LlamaConfig.from_dict(raw)
    ref = transformers.LlamaConfig.from_dict(dict(raw))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
                  "pretraining_tp"):
        assert getattr(ours, field) == getattr(ref, field), field
    ref_rope = {k: v for k, v in ref.rope_parameters.items() if k != "type"}
    assert ours.rope_parameters == ref_rope
    assert ours.dtype == str(ref.dtype).removeprefix("torch.")


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_round_trip_through_json_keeps_everything(tmp_path, name):
    raw = dict(HUB_CONFIGS[name], some_future_key={"nested": [1, 2]}, quantization_config=None)
    config = LlamaConfig.from_dict(raw)
    assert config.some_future_key == {"nested": [1, 2]}
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["some_future_key"] == {"nested": [1, 2]}
    assert written["transformers_version"] == raw["transformers_version"]
    again = LlamaConfig.from_pretrained(tmp_path)
    assert again == config
    # transformers reads what we wrote to the same rope settings.
    ref = transformers.LlamaConfig.from_pretrained(tmp_path)
    assert {k: v for k, v in ref.rope_parameters.items() if k != "type"} == config.rope_parameters


def test_derived_defaults_as_transformers():
    ours = LlamaConfig(hidden_size=96, num_attention_heads=6)
    ref = transformers.LlamaConfig(hidden_size=96, num_attention_heads=6)
    assert (ours.head_dim, ours.num_key_value_heads) == (ref.head_dim, ref.num_key_value_heads) == (16, 6)
    assert ours.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    explicit = LlamaConfig(hidden_size=96, num_attention_heads=6, head_dim=32, num_key_value_heads=2)
    assert (explicit.head_dim, explicit.num_key_value_heads) == (32, 2)


def test_yarn_defaults_original_max_position_embeddings():
    config = LlamaConfig(max_position_embeddings=4096, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert config.rope_parameters["original_max_position_embeddings"] == 4096


def test_torch_dtype_alias_and_eos_list():
    config = LlamaConfig(torch_dtype="torch.bfloat16", eos_token_id=[1, 7])
    assert config.dtype == "bfloat16"
    assert config.to_dict()["dtype"] == "bfloat16"
    assert config.eos_token_id == [1, 7]


@pytest.mark.parametrize("name", llama_port.available_presets())
def test_presets_load_and_build_on_meta(name):
    import torch

    config = LlamaConfig.from_preset(name)
    assert config.num_attention_heads % config.num_key_value_heads == 0
    with torch.device("meta"):
        model = llama_port.LlamaForCausalLM(config)
    expected = {"llama-2-7b": 6.74e9, "llama-3-8b": 8.03e9, "llama-3.1-405b": 405.9e9, "llama-3.2-1b": 1.24e9,
                "llama-3.2-3b": 3.21e9, "llama-2-70b": 68.98e9}
    if name in expected:
        assert abs(model.num_parameters() / expected[name] - 1) < 0.01, model.num_parameters()


def test_preset_rope_of_llama_3_1_and_3_2():
    assert LlamaConfig.from_preset("llama-3.1-8b").rope_parameters["factor"] == 8.0
    assert LlamaConfig.from_preset("llama-3.2-1b").rope_parameters["factor"] == 32.0
    assert LlamaConfig.from_preset("llama-3.2-1b").tie_word_embeddings is True


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match=r"preset 'llama-9' is unknown; expected one of \[.*'llama-3.2-1b'"):
        LlamaConfig.from_preset("llama-9")


BAD_CONFIGS = [
    (dict(rope_scaling={"rope_type": "ntk-magic", "factor": 2.0}), r"rope_type.*'ntk-magic'.*expected one of"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), r"llama3.*missing \['low_freq_factor'\]"),
    (dict(rope_scaling={"type": "linear"}), r"'linear' needs \['factor'\]; missing \['factor'\]"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                        "original_max_position_embeddings": 16}), r"short_factor.*expected head_dim // 2"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192}), r"high_freq_factor > low_freq_factor"),
    (dict(rope_theta=-1.0), r"rope_theta.*positive"),
    (dict(hidden_size=100, num_attention_heads=3), r"hidden_size=100 is not divisible by num_attention_heads=3"),
    (dict(num_attention_heads=32, num_key_value_heads=5), r"num_attention_heads=32 is not divisible by num_key_value_heads=5"),
    (dict(hidden_size=0), r"hidden_size=0; expected a positive integer"),
    (dict(num_hidden_layers=-2), r"num_hidden_layers=-2; expected a positive integer"),
    (dict(vocab_size=3.5), r"vocab_size=3.5; expected a positive integer"),
    (dict(hidden_act="mish"), r"hidden_act='mish'; expected one of \['silu'"),
    (dict(rms_norm_eps=0), r"rms_norm_eps=0"),
    (dict(torch_dtype="int8"), r"dtype='int8'; expected one of"),
    (dict(rope_scaling=[1, 2]), r"rope_scaling=\[1, 2\]; expected a dict or null"),
    (dict(hidden_size=64, num_attention_heads=4, head_dim=15), r"even head_dim"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[m[:30] for _, m in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**overrides)


def test_bad_json_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        LlamaConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LlamaConfig.from_pretrained(tmp_path / "..")
