"""Hostile or broken config.json values: each is refused with a ValueError (a CorruptCheckpointError
when read from a checkpoint) naming the field, in one line, and nothing is allocated from it; a
property test runs the readers over arbitrary JSON values in a memory- and time-bounded subprocess
(issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llama_port import LlamaConfig
from llama_port.checkpoints.errors import CorruptCheckpointError
from llama_port.checkpoints.hub import read_hub_config

NAN, INF = float("nan"), float("inf")
BASE = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=112,
            num_hidden_layers=2, max_position_embeddings=64)  # fmt: skip
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)  # fmt: skip


def nested(depth: int) -> list:
    """[[...[]...]], ``depth`` lists deep."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def refused(match: str, **fields) -> str:
    """The one-line ValueError LlamaConfig.from_dict(BASE | fields) raises, matching ``match``."""
    with pytest.raises(ValueError, match=match) as info:
        LlamaConfig.from_dict({**BASE, **fields})
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------- item 11: NaN and inf, ranges
def rope(base: dict, **keys) -> dict:
    return dict(rope_scaling={**base, **keys})


YARN = dict(rope_type="yarn", factor=4.0)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[1.0] * 8)
ROPE = r"LlamaConfig\.rope_parameters"


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rope_theta=NAN), rf"{ROPE}\['rope_theta'\]=nan; expected a finite positive number above 1"),
        (dict(rope_theta=INF), rf"{ROPE}\['rope_theta'\]=inf; expected a finite positive number above 1"),
        (dict(rope_theta=1.0), rf"{ROPE}\['rope_theta'\]=1\.0; expected a finite positive number above 1"),
        (rope(LLAMA3_ROPE, factor=NAN), rf"{ROPE}\['factor'\]=nan; expected a finite number >= 1"),
        (rope(LLAMA3_ROPE, factor=INF), rf"{ROPE}\['factor'\]=inf; expected a finite number >= 1"),
        (rope({"type": "linear"}, factor=0.0), rf"{ROPE}\['factor'\]=0\.0; expected a finite number >= 1"),
        (rope(LLAMA3_ROPE, low_freq_factor=-INF), rf"{ROPE}\['low_freq_factor'\]=-inf; expected a finite positive"),
        (rope(LLAMA3_ROPE, high_freq_factor=NAN), rf"{ROPE}\['high_freq_factor'\]=nan; expected a finite positive"),
        (rope(YARN, attention_factor=INF), rf"{ROPE}\['attention_factor'\]=inf; expected a finite number in \[0, 16\]"),
        (rope(YARN, beta_fast=NAN), rf"{ROPE}\['beta_fast'\]=nan; expected a finite positive number"),
        (rope(YARN, beta_slow=0), rf"{ROPE}\['beta_slow'\]=0; expected a finite positive number"),
        (rope(YARN, mscale=NAN), rf"{ROPE}\['mscale'\]=nan; expected a finite number in \[0, 16\]"),
        (rope(YARN, mscale_all_dim=INF), rf"{ROPE}\['mscale_all_dim'\]=inf; expected a finite number in \[0, 16\]"),
        (rope(YARN, truncate="no"), rf"{ROPE}\['truncate'\]='no'; expected a bool"),
        (rope(LONGROPE, short_factor=[1.0] * 7 + [NAN]),
         rf"{ROPE}\['short_factor'\]=\[1\.0, 1\.0, .*\]; expected a list, each a finite number >= 0\.001"),
        (rope(LONGROPE, long_factor=[INF] * 8), rf"{ROPE}\['long_factor'\]=\[inf, .*\]; expected a list, each"),
        (dict(rms_norm_eps=INF), r"LlamaConfig\.rms_norm_eps=inf; expected a finite positive number"),
        (dict(rms_norm_eps=NAN), r"LlamaConfig\.rms_norm_eps=nan; expected a finite positive number"),
        (dict(rms_norm_eps=10**400), r"LlamaConfig\.rms_norm_eps=<a 1329-bit integer>; expected a finite positive"),
        (dict(initializer_range=NAN), r"LlamaConfig\.initializer_range=nan; expected a finite number >= 0"),
        (dict(attention_dropout=NAN), r"LlamaConfig\.attention_dropout=nan; expected a finite number in \[0, 1\)"),
        (dict(attention_dropout=1.0), r"LlamaConfig\.attention_dropout=1\.0; expected a finite number in \[0, 1\)"),
    ],
    ids=lambda case: "" if isinstance(case, str) else json.dumps(case, default=str)[:40],
)
def test_non_finite_or_out_of_range_floats_are_refused(fields, match):
    refused(match, **fields)


# ------------------------------------------------- items 17 and 18: types and ranges of the rest
IN_VOCAB = r"expected null or an integer in \[0, vocab_size=128\)"


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(attention_bias="false"), r"LlamaConfig\.attention_bias='false'; expected a bool \(true or false\)"),
        (dict(mlp_bias=0), r"LlamaConfig\.mlp_bias=0; expected a bool"),
        (dict(tie_word_embeddings="true"), r"LlamaConfig\.tie_word_embeddings='true'; expected a bool"),
        (dict(use_cache=None), r"LlamaConfig\.use_cache=None; expected a bool"),
        (dict(vocab_size=True), r"LlamaConfig\.vocab_size=True; expected a positive integer <= 16777216"),
        (dict(hidden_size="4096"), r"LlamaConfig\.hidden_size='4096'; expected a positive integer"),
        (dict(hidden_size=3e9), r"LlamaConfig\.hidden_size=3000000000\.0; expected a positive integer <= 262144"),
        (dict(hidden_size=2**40), r"LlamaConfig\.hidden_size=1099511627776; expected a positive integer <= 262144"),
        (dict(num_hidden_layers=10**6), r"LlamaConfig\.num_hidden_layers=1000000; expected a positive integer <= 4096"),
        (dict(max_position_embeddings=64.0), r"LlamaConfig\.max_position_embeddings=64\.0; expected a positive"),
        (dict(num_attention_heads=0), r"LlamaConfig\.num_attention_heads=0; expected a positive integer"),
        (dict(hidden_act=["silu"]), r"LlamaConfig\.hidden_act=\['silu'\]; expected one of \['silu'"),
        (dict(pretraining_tp="1"), r"LlamaConfig\.pretraining_tp='1'; expected null or a positive integer"),
        (dict(pad_token_id=1e9), rf"LlamaConfig\.pad_token_id=1000000000\.0; {IN_VOCAB}"),
        (dict(pad_token_id=10**9), rf"LlamaConfig\.pad_token_id=1000000000; {IN_VOCAB}"),
        (dict(pad_token_id=-1), rf"LlamaConfig\.pad_token_id=-1; {IN_VOCAB}"),
        (dict(bos_token_id=True), rf"LlamaConfig\.bos_token_id=True; {IN_VOCAB}"),
        (dict(eos_token_id=["2"]), rf"LlamaConfig\.eos_token_id=\['2'\]; {IN_VOCAB} or a list of them"),
        (dict(eos_token_id=[2, 128]), rf"LlamaConfig\.eos_token_id=\[2, 128\]; {IN_VOCAB} or a list of them"),
        (dict(torch_dtype={"name": "bfloat16"}), r"LlamaConfig\.dtype=\{'name': 'bfloat16'\}; expected one of"),
        (rope(LLAMA3_ROPE, original_max_position_embeddings="64"),
         rf"{ROPE}\['original_max_position_embeddings'\]='64'; expected a positive integer"),
        (dict(original_max_position_embeddings="64", **rope(LLAMA3_ROPE)),  # the top-level key wins, as in transformers
         rf"{ROPE}\['original_max_position_embeddings'\]='64'; expected a positive integer"),
        (rope(LLAMA3_ROPE, rope_type=["llama3"]), rf"{ROPE}\['rope_type'\]=\['llama3'\]; expected one of"),
        (dict(rope_parameters="default"), rf"{ROPE}='default'; expected a dict or null"),
        (dict(head_dim=2, **rope({"rope_type": "dynamic", "factor": 2.0})), r"dynamic needs head_dim > 2, got 2"),
        (rope(LONGROPE, original_max_position_embeddings=1), r"longrope needs original_max_position_embeddings >= 2"),
        (dict(architectures=nested(33)), r"LlamaConfig\.architectures is nested more than 32 levels deep"),
    ],
    ids=lambda case: "" if isinstance(case, str) else json.dumps(case, default=str)[:40],
)
def test_fields_of_the_wrong_type_or_range_are_refused(fields, match):
    refused(match, **fields)


def test_a_huge_value_is_shown_short():
    message = refused(r"LlamaConfig\.hidden_act='xxxxx.*'; expected one of", hidden_act="x" * 10**6)
    assert len(message) < 300


# ----------------------------------------------------- item 15: unknown keys never shadow the config
@pytest.mark.parametrize("key", ["copy", "to_dict", "validate", "from_dict", "save_pretrained", "__dict__", "__class__",
                                 "__deepcopy__", "_attn_implementation", "_extra"])  # fmt: skip
def test_keys_naming_the_configs_own_attributes_are_refused(key):
    refused(rf"LlamaConfig: config key '{key}' is a name LlamaConfig itself uses", **{key: 1})


def test_unknown_keys_live_in_their_own_store_and_round_trip(tmp_path):
    """Read as attributes like transformers' configs; private ones (transformers writes
    _name_or_path) are kept and saved but not exposed; none can break copy, save or equality."""
    extra = {"some_future_key": {"nested": [1, 2]}, "_name_or_path": "org/model", "_extra_keys": ["copy"], "self": 3}
    config = LlamaConfig.from_dict({**BASE, **extra})
    assert config.some_future_key == {"nested": [1, 2]} and config.self == 3
    for private in ("_name_or_path", "_extra_keys"):
        assert not hasattr(config, private)
    assert config.copy() == config and callable(config.to_dict)
    assert {key: config.to_dict()[key] for key in extra} == extra
    config.save_pretrained(tmp_path)
    assert LlamaConfig.from_pretrained(tmp_path) == config
    with pytest.raises(AttributeError, match="no attribute 'not_there'"):
        config.not_there  # noqa: B018


# --------------------------------------------------------- items 9 and 17: config.json files
@pytest.mark.parametrize(
    "text, match",
    [
        ('{"vocab_size": ' + "[" * 200_000 + "]" * 200_000 + "}", r"config\.json: JSON nested too deeply to parse"),
        ('{"vocab_size": ' + "[" * 500 + "]" * 500 + "}", r"config\.json: LlamaConfig\.vocab_size is nested more"),
        (json.dumps({**BASE, "pad_token_id": 1e9}),
         rf"config\.json: LlamaConfig\.pad_token_id=1000000000\.0; {IN_VOCAB}"),
        (json.dumps({**BASE, "attention_bias": "false"}), r"config\.json: LlamaConfig\.attention_bias='false'; exp"),
        ('{"hidden_size": NaN}', r"config\.json: LlamaConfig\.hidden_size=nan; expected a positive integer"),
        ('{"rms_norm_eps": Infinity}', r"config\.json: LlamaConfig\.rms_norm_eps=inf; expected a finite positive"),
        ('{"vocab_size": 1' + "0" * 5000 + "}", r"config\.json: not valid JSON \(Exceeds the limit \(4300 digits\)"),
        (b'{"hidden_act": "\xff"}', r"config\.json: not valid JSON \('utf-8' codec can't decode"),
        ('{"to_dict": 1}', r"config\.json: LlamaConfig: config key 'to_dict' is a name LlamaConfig itself uses"),
    ],
    ids=["200k-deep", "500-deep", "pad-1e9", "bias-str", "nan", "inf", "5000-digits", "not-utf8", "shadowing-key"],
)
def test_hostile_config_json_names_the_file_and_field(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        read_hub_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # LlamaConfig's own reader gives the same message, as a plain ValueError.
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_pretrained(path)


def test_oversized_config_json_is_refused_by_its_size_before_reading(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(2**30)  # a sparse 1 GB file: read, it would cost gigabytes in json and in memory
    match = r"config\.json: over the 16 MiB limit for a config file \(real ones are a few KB\)"
    with pytest.raises(CorruptCheckpointError, match=match):
        read_hub_config(path)
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_json_file(path)


# ------------------------------------------------------------------ property test, bounded
MEMORY_LIMIT = 3 * 2**29  # 1.5 GiB of address space for the whole child (torch itself maps ~0.6 GiB)
TIME_LIMIT_S = 120  # it takes a few seconds; a loop that does not end fails the test


def test_arbitrary_values_load_or_raise_our_errors_in_bounded_memory(tmp_path):
    """run_properties() in a child process capped at MEMORY_LIMIT bytes and TIME_LIMIT_S seconds:
    a memory bomb raises MemoryError there (and fails this test), not on the machine."""
    code = (
        "import resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT})); "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_configuration_hostile as t; t.run_properties({str(tmp_path)!r})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIME_LIMIT_S, env=env)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "properties: ok" in result.stdout


# JSON values of every type, the edges that broke the readers, values nested deep and big, and
# plausible numbers, so that some hostile configs load (and then must work).
EDGE = st.sampled_from([0, -1, 1, 2, 3, 1.0, 0.5, 1.3, -0.0, 3e9, 10**30, 2**63, 1e308, 1e-308, NAN, INF, -INF, "",
                        "1.3", "64", "abc", "true", "false", "silu", "llama3", "yarn", "bfloat16", True, False, None,
                        [], {}, [1.0], nested(40)])  # fmt: skip
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | EDGE
JSON = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
PLAUSIBLE = (st.sampled_from([1, 2, 4, 8, 16, 64, 256, 8192]) | st.integers(-2, 70_000) | st.floats(-1.0, 1e5)
             | st.lists(st.floats(0.0, 100.0), min_size=8, max_size=8))  # fmt: skip
HOSTILE = st.one_of(PLAUSIBLE, EDGE, SCALAR, JSON, st.integers(1, 300).map(nested))  # deeper ones: spliced as text

ROPE_BASES = [{}, LLAMA3_ROPE, {**YARN, "beta_fast": 32, "mscale": 1.0}, {"type": "linear", "factor": 2.0},
              {"rope_type": "dynamic", "factor": 2.0}, LONGROPE]  # fmt: skip
ROPE_KEYS = [*LLAMA3_ROPE, "type", "rope_theta", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "short_factor", "long_factor", "truncate"]  # fmt: skip
CONFIG_KEYS = [*BASE, "head_dim", "hidden_act", "initializer_range", "rms_norm_eps", "attention_dropout",
               "pretraining_tp", "use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias", "pad_token_id",
               "bos_token_id", "eos_token_id", "dtype", "torch_dtype", "rope_theta", "rope_scaling", "rope_parameters",
               "model_type", "original_max_position_embeddings", "quantization_config", "copy", "__dict__", "_extra",
               "self", "some_future_key"]  # fmt: skip
PARAMS_BASES = [dict(dim=64, n_layers=2, n_heads=4, norm_eps=1e-5, multiple_of=16, vocab_size=-1),
                dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                     ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)]  # fmt: skip
PARAMS_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "model"]  # fmt: skip


@st.composite
def config_dicts(draw) -> dict:
    """A small valid config with up to 4 fields and 3 rope keys replaced by HOSTILE values."""
    rope = draw(st.sampled_from(ROPE_BASES)) | draw(st.dictionaries(st.sampled_from(ROPE_KEYS), HOSTILE, max_size=3))
    fields = draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), HOSTILE, max_size=4))
    return {**BASE, "rope_scaling": rope or None} | fields


def loads_cleanly(config: LlamaConfig) -> None:
    """A config that loaded round-trips, and its cos/sin are finite inside and past the trained context."""
    from llama_port.modeling import LlamaRotaryEmbedding

    assert LlamaConfig.from_dict(config.to_dict()) == config
    rotary = LlamaRotaryEmbedding(config)
    context = config.max_position_embeddings
    for positions in ([0, context - 1], [0, 2 * context]):  # the second updates dynamic's and longrope's frequencies
        cos, sin = rotary(torch.zeros(1), torch.tensor([positions]))
        assert torch.isfinite(cos).all() and torch.isfinite(sin).all(), config.rope_parameters


def run_properties(folder: str) -> None:
    """The hypothesis properties (run by the test above, in its bounded child): for arbitrary JSON
    values in config.json and params.json fields, every outcome is a config that loads cleanly, or
    a ValueError (every CheckpointError is one); any other exception, MemoryError included, fails."""
    from llama_port.checkpoints.meta import config_from_params, read_params

    torch.set_num_threads(1)
    root = Path(folder)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    bounded = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))  # fmt: skip

    @bounded
    @given(config_dicts(), st.none() | st.integers(1, 300_000))
    @example({**BASE, **rope(LLAMA3_ROPE, original_max_position_embeddings="64")}, None)
    @example({**BASE, "pad_token_id": 1e9, "attention_bias": "false", "copy": 1}, 200_000)
    def config_json_loads_or_is_refused(config_dict: dict, depth: int | None) -> None:
        """From the dict, then from a config.json of it (with a value ``depth`` lists deep spliced in)."""
        try:
            config = LlamaConfig.from_dict(config_dict)
        except ValueError:
            pass
        else:
            loads_cleanly(config)
        text = json.dumps(config_dict)
        if depth is not None:
            text = text[:-1] + ', "nested": ' + "[" * depth + "]" * depth + "}"
        path = root / "config.json"
        path.write_text(text)
        try:
            loads_cleanly(read_hub_config(path))
        except ValueError:
            pass

    @bounded
    @given(st.sampled_from(PARAMS_BASES), st.dictionaries(st.sampled_from(PARAMS_KEYS), HOSTILE, max_size=3))
    @example(PARAMS_BASES[0], {"dim": 3e9, "ffn_dim_multiplier": "1.3"})  # item 6: a 4 GB string, before the fix
    @example(PARAMS_BASES[0], {"dim": 3_000_000_000, "ffn_dim_multiplier": 1.3})
    def params_json_loads_or_is_refused(base: dict, overrides: dict) -> None:
        path = root / "meta" / "params.json"
        path.write_text(json.dumps({**base, **overrides}))
        try:
            loads_cleanly(config_from_params(read_params(path), 128, path.parent, torch.float32))
        except ValueError:
            pass

    config_json_loads_or_is_refused()
    params_json_loads_or_is_refused()
    print("properties: ok")
