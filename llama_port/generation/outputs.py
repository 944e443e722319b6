"""GenerateOutput: what generate(return_dict_in_generate=True) returns, with the field names of
transformers' GenerateDecoderOnlyOutput and llama_port.outputs.ModelOutput's access."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..outputs import ModelOutput


@dataclass
class GenerateOutput(ModelOutput):
    """sequences: prompt plus new tokens (B, T + N). scores / logits: one (B, V) float32 tensor per
    new token, after the processors and warpers / as the model gave them; None unless asked for
    (output_scores / output_logits). Attribute, key (``out["sequences"]``) and integer access
    (``out[0]``), the None fields skipped, as every ModelOutput."""

    sequences: Tensor | None = None
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
