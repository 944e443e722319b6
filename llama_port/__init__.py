"""llama_port: a readable PyTorch LLaMA whose logits are checked against transformers'.

The public API. Importing it needs torch alone: checkpoint formats (llama_port.checkpoints), the
parity tool (llama_port.parity) and the command line (llama_port.cli) are imported when used.
"""

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
