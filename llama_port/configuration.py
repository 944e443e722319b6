"""LlamaConfig: the hyper-parameters of a LLaMA decoder, with transformers' field names.

Reads every config.json found on the Hub for LLaMA models: transformers 5's ``rope_parameters`` and
the legacy ``rope_theta`` + ``rope_scaling`` (with ``type`` or ``rope_type``, or ``null``), and
``dtype`` or the older ``torch_dtype``. Keys it does not know are kept as attributes and written
back, so a Hub config.json round-trips.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .activations import ACTIVATIONS
from .dtypes import DTYPES
from .rope import ROPE_TYPES

CONFIG_NAME = "config.json"

DEFAULT_ROPE_THETA = 10_000.0

_DTYPE_NAMES = (*DTYPES, "auto")


class LlamaConfig:
    """Configuration of a LLaMA model, field for field as transformers' ``LlamaConfig``.

    Derived defaults as transformers derives them: ``head_dim = hidden_size // num_attention_heads``
    and ``num_key_value_heads = num_attention_heads`` when not given. ``rope_parameters`` is always
    a dict holding at least ``rope_type`` and ``rope_theta`` after construction. Invalid values
    raise ``ValueError`` naming the field and what is allowed.
    """

    model_type = "llama"
    # The attention backend of the model built from this config, as transformers keeps it: set by
    # the model (LlamaPreTrainedModel), read by every attention layer, never saved.
    _attn_implementation: str | None = None

    def __init__(
        self,
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
        # Everything else (architectures, model_type, transformers_version, quantization_config, ...)
        # is kept verbatim and written back by to_dict().
        kwargs.pop("model_type", None)
        self._extra_keys: list[str] = []
        for key, value in kwargs.items():
            setattr(self, key, value)
            self._extra_keys.append(key)
        self.validate()

    # ----------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what is allowed."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name}={value!r}; expected a positive integer")
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
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"LlamaConfig.hidden_act={self.hidden_act!r}; expected one of {list(ACTIVATIONS)}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps!r}; expected a positive number")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"LlamaConfig.attention_dropout={self.attention_dropout!r}; expected 0 <= p < 1")
        _validate_rope_parameters(self.rope_parameters, self.head_dim)

    # ------------------------------------------------------------------------------- serialisation
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Build from a config.json-style dict (legacy or current keys); ``overrides`` win."""
        merged = copy.deepcopy(dict(config_dict))
        merged.update(overrides)
        return cls(**merged)

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
        for key in self._extra_keys:
            out[key] = copy.deepcopy(getattr(self, key))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LlamaConfig:
        path = Path(path)
        try:
            config_dict = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(config_dict, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(config_dict).__name__}")
        return cls.from_dict(config_dict)

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


def available_presets() -> list[str]:
    """Names accepted by ``LlamaConfig.from_preset``."""
    folder = resources.files("llama_port.configs")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _floordiv_or_none(a: Any, b: Any) -> Any:
    # Leave validation to validate(): a bad value must reach it, not fail here with ZeroDivisionError.
    return a // b if isinstance(a, int) and isinstance(b, int) and b > 0 else None


def _dtype_field(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"LlamaConfig.dtype={value!r}; expected one of {list(_DTYPE_NAMES)}")
    return name


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
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise ValueError(f"LlamaConfig.rope_scaling={rope_scaling!r}; expected a dict or null")
    if rope_parameters is not None and not isinstance(rope_parameters, dict):
        raise ValueError(f"LlamaConfig.rope_parameters={rope_parameters!r}; expected a dict or null")
    params = copy.deepcopy(rope_scaling or rope_parameters or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    params.setdefault("rope_theta", DEFAULT_ROPE_THETA if rope_theta is None else rope_theta)
    rope_type = ROPE_TYPES.get(params["rope_type"])
    if rope_type is not None and rope_type.uses_original_max:
        # As transformers: a top-level original_max_position_embeddings wins, else the dict's, else
        # max_position_embeddings.
        if top_level_original_max is not None:
            params["original_max_position_embeddings"] = top_level_original_max
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def _validate_rope_parameters(params: dict[str, Any], head_dim: int) -> None:
    """Against rope.ROPE_TYPES: a known type, its required keys, a positive theta and factor, and
    the type's own checks."""
    name = params["rope_type"]
    if name not in ROPE_TYPES:
        raise ValueError(
            f"LlamaConfig.rope_parameters['rope_type']={name!r}; expected one of {sorted(ROPE_TYPES)}"
        )
    rope_type = ROPE_TYPES[name]
    missing = [key for key in rope_type.required_keys if params.get(key) is None]
    if missing:
        raise ValueError(
            f"LlamaConfig.rope_parameters: rope_type {name!r} needs {list(rope_type.required_keys)}; "
            f"missing {missing}"
        )
    theta = params["rope_theta"]
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"LlamaConfig.rope_parameters['rope_theta']={theta!r}; expected a positive number")
    factor = params.get("factor")
    if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
        raise ValueError(f"LlamaConfig.rope_parameters['factor']={factor!r}; expected a positive number")
    if rope_type.check is not None:
        rope_type.check(params, head_dim)


def _legacy_rope_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """rope_parameters in the pre-transformers-5 ``rope_scaling`` form (``None`` for default RoPE)."""
    if params["rope_type"] == "default":
        return None
    return {key: copy.deepcopy(value) for key, value in params.items() if key != "rope_theta"}
