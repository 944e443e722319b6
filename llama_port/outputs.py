"""Model outputs that behave as transformers' ``ModelOutput``, in torch alone.

An output is a dataclass and an ordered dict at once, the contract Hugging Face clients (Trainer,
PEFT, pipelines, lm-eval) rely on: ``out.logits``, ``out["logits"]`` and ``out[0]`` all work. The
dict holds only the fields that are not None, in field order, so ``keys()``, ``items()``,
``values()``, integer indexing and ``to_tuple()`` skip the None ones exactly as transformers does
(``out[0]`` is the loss when labels were given, the logits otherwise). Each output class is a
pytree node, so ``torch.export`` and DDP(static_graph=True) see its tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor


class ModelOutput(OrderedDict):
    """Base of the output dataclasses: attribute, key and integer access over the non-None fields.

    Every field defaults to None. Setting a field (as an attribute or a key, including in the
    dataclass __init__) to a value keeps the attribute and the dict in step; ``del``, ``pop``,
    ``update`` and ``setdefault`` raise TypeError (transformers raises a bare Exception), so the
    dict changes only through the fields.
    """

    def __init_subclass__(cls) -> None:
        # Registered once per class, outside tracing (dynamo need not trace the registration).
        pytree.register_pytree_node(
            cls,
            _flatten,
            lambda values, keys: cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
            flatten_with_keys_fn=pytree._dict_flatten_with_keys,
        )

    def __post_init__(self) -> None:
        # transformers' other constructor, ``Output({"logits": ...})``: one mapping of fields as the
        # only argument. accelerate's hooks rebuild outputs this way (type(out)(moved_dict)).
        first, *rest = fields(self)
        mapping = getattr(self, first.name)
        if isinstance(mapping, Mapping) and all(getattr(self, f.name) is None for f in rest):
            unknown = set(mapping) - {f.name for f in fields(self)}
            if unknown:
                raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
            OrderedDict.__delitem__(self, first.name)
            super().__setattr__(first.name, None)
            for name, value in mapping.items():
                setattr(self, name, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        """``out["logits"]`` by name (KeyError for a None field); ``out[0]``, ``out[1:]`` over to_tuple()."""
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if value is not None and name in {field.name for field in fields(self)}:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __delitem__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support item deletion")

    def setdefault(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support setdefault")

    def pop(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support pop")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support update")

    def __reduce__(self):
        # Pickle by fields: the constructor rebuilds the dict part.
        callable_, _args, *remaining = super().__reduce__()
        return callable_, tuple(getattr(self, field.name) for field in fields(self)), *remaining

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-None fields' values, in field order."""
        return tuple(self[key] for key in self.keys())


def _flatten(output: ModelOutput) -> tuple[list[Any], list[str]]:
    return list(output.values()), list(output.keys())


@dataclass
class LlamaModelOutput(ModelOutput):
    """transformers' BaseModelOutputWithPast. last_hidden_state (B, T, C) after the final norm;
    past_key_values: the cache read and extended, when caching; hidden_states: embeddings then each
    layer's output (the last one normed), when asked; attentions: (B, H, T, S) per layer, when asked."""

    last_hidden_state: Tensor | None = None
    past_key_values: Any = None  # a llama_port KVCache
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    """transformers' CausalLMOutputWithPast. loss: next-token cross-entropy when labels were given;
    logits (B, T', V) for the kept positions; the rest as LlamaModelOutput."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: Any = None  # a llama_port KVCache
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


__all__ = ["CausalLMOutput", "LlamaModelOutput", "ModelOutput"]
