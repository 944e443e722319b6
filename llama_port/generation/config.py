"""GenerationConfig: generate()'s defaults, with transformers' field names, read from and written to
generation_config.json.

As transformers 5, every field defaults to None, meaning "not set here": generate() takes each
value from its explicit argument, else the ``generation_config=`` passed to it, else
``model.generation_config``, else transformers' global default (DEFAULTS). A transformers
GenerationConfig works wherever ours does: it is read attribute by attribute (``as_generation_config``),
never imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..configuration import read_json_file

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers' GenerationConfig._get_default_generation_params() for the fields generate() implements.
DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_return_sequences": 1,
    "num_beams": 1,
    "use_cache": True,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
}

# transformers' generation options generate() does not implement, each with the value that leaves
# it off (None: unset, also off). A config holding anything else raises ValueError naming it.
UNSUPPORTED: dict[str, Any] = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "penalty_alpha": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "guidance_scale": 1.0,
    "watermarking_config": None,
    "max_time": None,
    "output_attentions": False,
    "output_hidden_states": False,
    "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None,
}

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class GenerationConfig:
    """generate()'s settings; None: not set (see the module docstring for where the value comes from).

    max_length / max_new_tokens: total length (prompt width included) / new tokens; max_new_tokens
        wins when both are set. min_length / min_new_tokens: likewise, below which eos cannot be drawn.
    extra: the other keys of a generation_config.json (transformers_version, options generate()
        does not implement), kept so a save writes them back.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int | None = None
    num_beams: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    return_dict_in_generate: bool | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    use_cache: bool | None = None
    cache_implementation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Derived from a model config (no generation_config.json), and the token ids it was given then:
    # while they are unchanged, generate() follows the model config's current ids (as transformers 4).
    _from_model_config: bool = field(default=False, repr=False)
    _derived_ids: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def field_names(cls) -> list[str]:
        """The settings' names (transformers'), without ``extra`` and the private bookkeeping."""
        return [f.name for f in fields(cls) if f.name != "extra" and not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationConfig:
        """From a generation_config.json dict: known keys become fields, the rest ``extra``."""
        names = set(cls.field_names())
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names and k != "_from_model_config"}
        return cls(**known, extra=extra, _from_model_config=bool(values.get("_from_model_config", False)))

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The defaults a model config implies: its bos, eos and pad ids (as transformers' from_model_config)."""
        ids = {name: getattr(config, name, None) for name in _TOKEN_IDS}
        return cls(**ids, _from_model_config=True, _derived_ids=tuple(_frozen(v) for v in ids.values()))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, error: type[Exception] = ValueError) -> GenerationConfig:
        """Read ``folder``/generation_config.json (or that file itself); ``error`` naming the file
        if it is not a JSON object (configuration.read_json_file's checks)."""
        path = Path(folder)
        return cls.from_dict(read_json_file(path / GENERATION_CONFIG_NAME if path.is_dir() else path, error))

    def to_dict(self) -> dict[str, Any]:
        """The set fields (not None) and ``extra``, as generation_config.json holds them."""
        out = {name: getattr(self, name) for name in self.field_names() if getattr(self, name) is not None}
        out.update(self.extra)
        if self._from_model_config:
            out["_from_model_config"] = True
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What transformers' pipelines read: the values that differ from the defaults, i.e. the set ones."""
        return self.to_dict()

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder``/generation_config.json; returns its path."""
        path = Path(folder) / GENERATION_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the named fields in place; returns the kwargs that name none (as transformers' update)."""
        names = set(self.field_names())
        for name, value in kwargs.items():
            if name in names:
                setattr(self, name, value)
        return {k: v for k, v in kwargs.items() if k not in names}

    def following(self, config: Any) -> GenerationConfig:
        """This config, with the model config's current token ids if it was derived from that
        config and its own ids were not changed since (else unchanged)."""
        ids = tuple(_frozen(getattr(self, name)) for name in _TOKEN_IDS)
        if not self._from_model_config or ids != self._derived_ids:
            return self
        return replace(self, **{name: getattr(config, name, None) for name in _TOKEN_IDS})


def as_generation_config(config: Any) -> GenerationConfig:
    """Ours, or a transformers GenerationConfig read by attribute name. ValueError naming any option
    generate() does not implement that the config sets (UNSUPPORTED)."""
    if isinstance(config, GenerationConfig):
        ours, others = config, config.extra
    else:
        ours = GenerationConfig(**{name: getattr(config, name, None) for name in GenerationConfig.field_names()})
        others = {name: getattr(config, name, None) for name in UNSUPPORTED}
    set_unsupported = {
        name: value for name, value in {**others, "num_beams": ours.num_beams}.items()
        if name in UNSUPPORTED and value is not None and value != UNSUPPORTED[name]
    }
    if set_unsupported:
        raise ValueError(f"generation_config sets options generate() does not implement: {set_unsupported}")
    return ours


def _frozen(value: Any) -> Any:
    """A token id or list of them, hashable and comparable."""
    return tuple(value) if isinstance(value, list) else value
