"""llama_port: a readable PyTorch LLaMA whose logits are checked against transformers'."""

from .cache import DynamicCache, StaticCache
from .configuration import LlamaConfig, available_presets
from .modeling import (
    CausalLMOutput,
    LlamaForCausalLM,
    LlamaModel,
    LlamaModelOutput,
    LlamaPreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "CausalLMOutput",
    "DynamicCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlamaModelOutput",
    "LlamaPreTrainedModel",
    "StaticCache",
    "__version__",
    "available_presets",
]
