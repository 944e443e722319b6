"""LlamaConfig: the hyper-parameters of a LLaMA decoder, with transformers' field names.

Reads every config.json found on the Hub for LLaMA models: transformers 5's ``rope_parameters`` and
the legacy ``rope_theta`` + ``rope_scaling`` (with ``type`` or ``rope_type``, or ``null``), and
``dtype`` or the older ``torch_dtype``. Keys it does not know are kept in a store of their own,
readable as attributes and written back, so a Hub config.json round-trips.

Every field is checked against a table (``CONFIG_FIELDS``, ``ROPE_FIELDS``): ints are ints (not
bools, strings or floats), floats are finite, sizes are bounded, so a hostile config is refused
with a ValueError naming the field before anything is built from it. The checkpoint readers
check their own formats' fields against the same specs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .activations import ACTIVATIONS
from .dtypes import DTYPES, dtype_name
from .rope import ROPE_TYPES

CONFIG_NAME = "config.json"

DEFAULT_ROPE_THETA = 10_000.0

_DTYPE_NAMES = (*DTYPES, "auto")

MAX_CONFIG_BYTES = 16 * 2**20  # config.json / params.json; real ones are a few KB
MAX_NESTING = 32  # levels of dicts and lists in one config value; Hub configs use 3 or 4

# transformers' PretrainedConfig attributes that Hugging Face clients read (Trainer, PEFT, pipelines,
# generate), answered with transformers' defaults when the config dict does not carry the key. With
# the properties rope_scaling, torch_dtype, use_return_dict, name_or_path and get_text_config(),
# this is the whole compatibility surface; nothing here changes the model.
COMPAT_DEFAULTS: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "is_encoder_decoder": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict": True,
    "torchscript": False,
}


# ---------------------------------------------------------------------------------- field specs
@dataclass(frozen=True)
class FieldSpec:
    """What one field may hold: ``accepts(value)``, and ``expected``, the words for it in an error."""

    accepts: Callable[[Any], bool]
    expected: str

    def or_null(self) -> FieldSpec:
        return FieldSpec(lambda value: value is None or self.accepts(value), f"null or {self.expected}")

    def check(self, label: str, value: Any, error: type[Exception] = ValueError) -> None:
        """Raise ``error("<label>=<value>; expected ...")`` unless the value is accepted."""
        if not self.accepts(value):
            raise error(f"{label}={short_repr(value)}; expected {self.expected}")


def _is_int(value: Any) -> bool:
    """An int and not a bool (JSON's true is no integer)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite float, or an int a float holds exactly (torch takes no bigger one), not a bool."""
    return (_is_int(value) and abs(value) <= 2**53) or (isinstance(value, float) and math.isfinite(value))


def integer(low: int, high: int) -> FieldSpec:
    """An int (not a bool, float or string) in [low, high]."""
    words = f"a positive integer <= {high}" if low == 1 else f"an integer in [{low}, {high}]"
    return FieldSpec(lambda value: _is_int(value) and low <= value <= high, words)


def number(test: Callable[[float], bool], words: str) -> FieldSpec:
    """A finite number (int or float, not a bool) passing ``test``."""
    return FieldSpec(lambda value: _is_number(value) and test(value), words)


def _list_of(item: FieldSpec) -> FieldSpec:
    return FieldSpec(
        lambda value: isinstance(value, list) and all(map(item.accepts, value)), f"a list, each {item.expected}"
    )


_POSITIVE = number(lambda v: v > 0, "a finite positive number")
BOOL = FieldSpec(lambda value: isinstance(value, bool), "a bool (true or false)")

# Sizes are bounded far above every published LLaMA (405B: hidden 16384, FFN 53248, 126 layers,
# 128 heads; vocabularies up to 256k; contexts up to 10M), so a hostile size is refused here, not
# allocated later. Checked in this order by LlamaConfig.validate().
CONFIG_FIELDS: dict[str, FieldSpec] = {
    "vocab_size": integer(1, 2**24),
    "hidden_size": integer(1, 2**18),
    "intermediate_size": integer(1, 2**20),
    "num_hidden_layers": integer(1, 2**12),
    "num_attention_heads": integer(1, 2**12),
    "num_key_value_heads": integer(1, 2**12),
    "head_dim": integer(1, 2**12),
    "max_position_embeddings": integer(1, 2**26),
    "hidden_act": FieldSpec(lambda v: isinstance(v, str) and v in ACTIVATIONS, f"one of {list(ACTIVATIONS)}"),
    "initializer_range": number(lambda v: v >= 0, "a finite number >= 0"),
    "rms_norm_eps": _POSITIVE,
    "attention_dropout": number(lambda v: 0 <= v < 1, "a finite number in [0, 1)"),
    "pretraining_tp": integer(1, 2**12).or_null(),
    "use_cache": BOOL,
    "tie_word_embeddings": BOOL,
    "attention_bias": BOOL,
    "mlp_bias": BOOL,
}

# Every rope_parameters key any rope type reads, whichever type is set (None counts as absent). The
# ranges keep the float32 frequencies and cos/sin finite: theta <= 1 gives 1 rad/token and more
# (infinite for a tiny theta), an attention scale past 16 multiplies cos/sin towards overflow.
_SCALE = number(lambda v: 0 <= v <= 16, "a finite number in [0, 16]")  # real ones: 1 to 1.4
# Per-frequency divisors (Phi-3's are 1 to ~60); a tiny one is an infinite float32 frequency.
_DIVISORS = _list_of(number(lambda v: v >= 1e-3, "a finite number >= 0.001"))
ROPE_FIELDS: dict[str, FieldSpec] = {
    "rope_theta": number(lambda v: v > 1, "a finite positive number above 1"),
    "factor": number(lambda v: v >= 1, "a finite number >= 1"),  # transformers warns below 1
    "original_max_position_embeddings": CONFIG_FIELDS["max_position_embeddings"],
    "attention_factor": _SCALE,
    "beta_fast": _POSITIVE,
    "beta_slow": _POSITIVE,
    "mscale": _SCALE,
    "mscale_all_dim": _SCALE,
    "low_freq_factor": _POSITIVE,
    "high_freq_factor": _POSITIVE,
    "short_factor": _DIVISORS,
    "long_factor": _DIVISORS,
    "truncate": BOOL,
}


def token_id_fields(vocab_size: int) -> dict[str, FieldSpec]:
    """pad/bos/eos ids: null, or ids inside the vocabulary; eos may also be a list of them."""
    one = FieldSpec(lambda v: _is_int(v) and 0 <= v < vocab_size, f"an integer in [0, vocab_size={vocab_size})")
    many = FieldSpec(lambda v: one.accepts(v) or _list_of(one).accepts(v), f"{one.expected} or a list of them")
    return {"pad_token_id": one.or_null(), "bos_token_id": one.or_null(), "eos_token_id": many.or_null()}


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() itself refuses ints past 4300 digits (ValueError): say how big instead.
        return f"<a {x.bit_length()}-bit integer>" if x.bit_length() > 128 else super().repr_int(x, level)


_REPR = _ShortRepr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def short_repr(value: Any) -> str:
    """repr() cut to one short line, whatever the size or depth of the value (for error messages)."""
    return _REPR.repr(value)


def read_json_file(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path`` (config.json, params.json).

    Raises ``error`` naming the file for one over MAX_CONFIG_BYTES (by stat, before anything is
    read, and again by what is read, for a file that is not regular), invalid JSON, JSON nested
    past the parser's recursion limit, or anything but an object.
    """
    limit = MAX_CONFIG_BYTES
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size > limit or len(data := f.read(limit + 1)) > limit:
            raise error(f"{path}: over the {limit >> 20} MiB limit for a config file (real ones are a few KB)")
    try:
        value = json.loads(data)
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to parse (a config is a few levels deep)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an int past Python's 4300 digits
        raise error(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class LlamaConfig:
    """Configuration of a LLaMA model, field for field as transformers' ``LlamaConfig``.

    Derived defaults as transformers derives them: ``head_dim = hidden_size // num_attention_heads``
    and ``num_key_value_heads = num_attention_heads`` when not given. ``rope_parameters`` is always
    a dict holding at least ``rope_type`` and ``rope_theta`` after construction. Invalid values
    raise ``ValueError`` naming the field and what is allowed.

    Unknown keys (architectures, transformers_version, quantization_config, ...) live in a store of
    their own, so none can shadow a field or method: public ones read as attributes (as on
    transformers' configs), all are written back by to_dict(). Dunder names and the names
    LlamaConfig itself uses (``copy``, ``to_dict``, ``_attn_implementation``, ...) are refused.
    """

    model_type = "llama"
    # The attention backend of the model built from this config, as transformers keeps it: set by
    # the model (LlamaPreTrainedModel), read by every attention layer, never saved.
    _attn_implementation: str | None = None

    def __init__(
        self,
        /,  # so that a config key "self" lands in kwargs, not on the instance argument
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pretraining_tp: int | None = 1,
        tie_word_embeddings: bool = False,
        rope_parameters: dict[str, Any] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else _floordiv_or_none(hidden_size, num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pretraining_tp = pretraining_tp
        self.tie_word_embeddings = tie_word_embeddings
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias

        # Legacy spellings: torch_dtype (transformers 4), rope_theta + rope_scaling (before transformers 5).
        legacy_dtype = kwargs.pop("torch_dtype", None)
        self.dtype = _dtype_field(dtype if dtype is not None else legacy_dtype)
        self.rope_parameters = _standardize_rope_parameters(
            rope_parameters,
            rope_scaling=kwargs.pop("rope_scaling", None),
            rope_theta=kwargs.pop("rope_theta", None),
            max_position_embeddings=max_position_embeddings,
            top_level_original_max=kwargs.get("original_max_position_embeddings"),
        )
        kwargs.pop("model_type", None)
        self._extra: dict[str, Any] = {}
        reserved = set(dir(self))
        for key, value in kwargs.items():
            if key.startswith("__") or key in reserved:
                raise ValueError(f"LlamaConfig: config key {short_repr(key)} is a name LlamaConfig itself uses")
            self._extra[key] = value
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """Unknown config keys, as attributes (only reached when no real attribute has the name);
        then transformers' defaults for the COMPAT_DEFAULTS keys a config dict did not carry."""
        extra = self.__dict__.get("_extra", {})  # not self._extra: copy and pickle probe before __init__
        if name in extra and not name.startswith("_"):
            return extra[name]
        if name in COMPAT_DEFAULTS:
            return copy.deepcopy(COMPAT_DEFAULTS[name])
        raise AttributeError(f"'LlamaConfig' object has no attribute {name!r}")

    # ------------------------------------------------------------- transformers compatibility
    # Read-only views that Hugging Face clients (Trainer, PEFT, pipelines) read off a config.
    @property
    def rope_scaling(self) -> dict[str, Any]:
        """transformers 5's alias of rope_parameters."""
        return self.rope_parameters

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a torch dtype (transformers 4's name for it), None when unset or "auto"."""
        return DTYPES.get(self.dtype)  # None for "auto" too

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict and not self.torchscript

    @property
    def name_or_path(self) -> str:
        """What from_pretrained was given (saved as ``_name_or_path``, as transformers does); "" otherwise."""
        return self._extra.get("_name_or_path", "")

    @name_or_path.setter
    def name_or_path(self, value: str | os.PathLike) -> None:
        self._extra["_name_or_path"] = str(value)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> LlamaConfig:
        """transformers' accessor for a multimodal model's text part: a LLaMA config is its own."""
        return self

    # ----------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what is allowed."""
        for name, spec in CONFIG_FIELDS.items():
            spec.check(f"LlamaConfig.{name}", getattr(self, name))
        for name, spec in token_id_fields(self.vocab_size).items():  # once vocab_size is known good
            spec.check(f"LlamaConfig.{name}", getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"LlamaConfig.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs whole groups)"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim}; rotary embeddings need an even head_dim")
        _validate_rope_parameters(self.rope_parameters, self.head_dim)

    # ------------------------------------------------------------------------------- serialisation
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Build from a config.json-style dict (legacy or current keys), copied; ``overrides`` win.
        ValueError for a value nested more than MAX_NESTING levels deep."""
        merged = {**config_dict, **overrides}
        for key, value in merged.items():
            if _nested_deeper_than(value, MAX_NESTING):
                raise ValueError(f"LlamaConfig.{key} is nested more than {MAX_NESTING} levels deep")
        return cls(**copy.deepcopy(merged))

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that both transformers 5 and older transformers read correctly.

        Writes transformers 5's ``rope_parameters`` and also the legacy ``rope_theta`` /
        ``rope_scaling`` pair, which older transformers needs (it ignores rope_parameters and would
        fall back to theta 10000) and which transformers 5 reads to the same values.
        """
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": self.use_cache,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pretraining_tp": self.pretraining_tp,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": copy.deepcopy(self.rope_parameters),
            "rope_theta": self.rope_parameters["rope_theta"],
            "rope_scaling": _legacy_rope_scaling(self.rope_parameters),
            "attention_bias": self.attention_bias,
            "attention_dropout": self.attention_dropout,
            "mlp_bias": self.mlp_bias,
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        out.update(copy.deepcopy(self._extra))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LlamaConfig:
        """ValueError naming the file for one read_json_file refuses or a value from_dict refuses."""
        config_dict = read_json_file(Path(path))
        try:
            return cls.from_dict(config_dict)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs: Any) -> LlamaConfig:
        """Read config.json from a local folder (or the file itself) or a Hub repo id.

        ``hub_kwargs`` (revision, token, cache_dir, local_files_only) go to huggingface_hub.
        """
        path = Path(name_or_path)
        if path.is_file():
            return cls.from_json_file(path)
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"{path}: no {CONFIG_NAME} in this folder")
            return cls.from_json_file(path / CONFIG_NAME)
        from huggingface_hub import hf_hub_download

        return cls.from_json_file(hf_hub_download(str(name_or_path), CONFIG_NAME, **hub_kwargs))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``save_directory/config.json`` (creating the folder); returns its path."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CONFIG_NAME
        target.write_text(self.to_json_string())
        return target

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A published model's config by name, e.g. ``"llama-3.2-1b"`` (see ``available_presets()``)."""
        presets = available_presets()
        if name not in presets:
            raise ValueError(f"preset {name!r} is unknown; expected one of {presets}")
        text = resources.files("llama_port.configs").joinpath(f"{name}.json").read_text()
        return cls.from_dict(json.loads(text), **overrides)

    # ------------------------------------------------------------------------------------- helpers
    def copy(self) -> LlamaConfig:
        return LlamaConfig.from_dict(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LlamaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LlamaConfig {self.to_json_string()}"


def as_llama_config(config: object) -> LlamaConfig:
    """Ours as is; a transformers LlamaConfig (anything with ``model_type == "llama"`` and to_dict())
    converted through its dict; TypeError for anything else."""
    if isinstance(config, LlamaConfig):
        return config
    if getattr(config, "model_type", None) == "llama" and callable(getattr(config, "to_dict", None)):
        return LlamaConfig.from_dict(config.to_dict())
    raise TypeError(
        f"config must be a llama_port.LlamaConfig or a transformers LlamaConfig, got {type(config).__name__}"
    )


def available_presets() -> list[str]:
    """Names accepted by ``LlamaConfig.from_preset``."""
    folder = resources.files("llama_port.configs")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether dicts and lists nest more than ``limit`` levels in ``value``: walked with a stack of
    iterators, one per level, so neither recursion nor memory grows with the value's size."""
    stack = [iter([value])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, (dict, list)):
                if len(stack) > limit:
                    return True
                stack.append(iter(item.values() if isinstance(item, dict) else item))
                break
        else:
            stack.pop()
    return False


def _floordiv_or_none(a: Any, b: Any) -> Any:
    # Leave validation to validate(): a bad value must reach it, not fail here with ZeroDivisionError.
    return a // b if isinstance(a, int) and isinstance(b, int) and b > 0 else None


def _dtype_field(value: Any) -> str | None:
    if value is None:
        return None
    name = dtype_name(value) if value in DTYPES.values() else value
    if not isinstance(name, str) or name.removeprefix("torch.") not in _DTYPE_NAMES:
        raise ValueError(f"LlamaConfig.dtype={short_repr(value)}; expected one of {list(_DTYPE_NAMES)}")
    return name.removeprefix("torch.")


def _standardize_rope_parameters(
    rope_parameters: dict[str, Any] | None,
    rope_scaling: dict[str, Any] | None,
    rope_theta: float | None,
    max_position_embeddings: int,
    top_level_original_max: int | None,
) -> dict[str, Any]:
    """One ``rope_parameters`` dict from current or legacy keys, as transformers 5 standardises it.

    Precedence as in transformers: a legacy ``rope_scaling`` dict wins over ``rope_parameters``;
    ``rope_theta`` fills in when the dict lacks it; ``type`` is read as ``rope_type``.
    """
    for name, value in (("rope_scaling", rope_scaling), ("rope_parameters", rope_parameters)):
        _ROPE_DICT.check(f"LlamaConfig.{name}", value)
    params = copy.deepcopy(rope_scaling or rope_parameters or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if params.get("rope_theta") is None:  # absent or null, as every rope key
        params["rope_theta"] = DEFAULT_ROPE_THETA if rope_theta is None else rope_theta
    _ROPE_TYPE.check("LlamaConfig.rope_parameters['rope_type']", params["rope_type"])
    rope_type = ROPE_TYPES[params["rope_type"]]
    if rope_type.uses_original_max:
        # As transformers: a top-level original_max_position_embeddings wins, else the dict's, else
        # max_position_embeddings.
        if top_level_original_max is not None:
            params["original_max_position_embeddings"] = top_level_original_max
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


_ROPE_DICT = FieldSpec(lambda value: value is None or isinstance(value, dict), "a dict or null")
_ROPE_TYPE = FieldSpec(lambda value: isinstance(value, str) and value in ROPE_TYPES, f"one of {sorted(ROPE_TYPES)}")


def _validate_rope_parameters(params: dict[str, Any], head_dim: int) -> None:
    """Against rope.ROPE_TYPES: its required keys, every key's ROPE_FIELDS spec, and the type's own
    checks (the type itself is checked when the dict is standardised)."""
    name = params["rope_type"]
    rope_type = ROPE_TYPES[name]
    missing = [key for key in rope_type.required_keys if params.get(key) is None]
    if missing:
        raise ValueError(
            f"LlamaConfig.rope_parameters: rope_type {name!r} needs {list(rope_type.required_keys)}; "
            f"missing {missing}"
        )
    for key, spec in ROPE_FIELDS.items():
        if params.get(key) is not None:
            spec.check(f"LlamaConfig.rope_parameters[{key!r}]", params[key])
    if rope_type.check is not None:
        rope_type.check(params, head_dim)


def _legacy_rope_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """rope_parameters in the pre-transformers-5 ``rope_scaling`` form (``None`` for default RoPE)."""
    if params["rope_type"] == "default":
        return None
    return {key: copy.deepcopy(value) for key, value in params.items() if key != "rope_theta"}
