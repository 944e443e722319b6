"""Two checkpoints of one model, in different formats: is the conversion faithful?

``compare_checkpoints(a, b, ...)`` runs llama_port's model (the one plain parity proves equal to
transformers') on both, each side read by the reader of its own format (llama_port.checkpoints:
Hub safetensors or .bin, Meta consolidated.*.pth, GGUF, quantised GGUF included) with its own
checks, and compares them as ``compare`` compares two models: so what differs is the weights.
The report is the same: per-layer carried and local errors, the first divergent layer (a
conversion that left one layer's q_proj in Meta's interleaved layout is named at that layer),
logit metrics and KL. ``stream=True`` compares them one decoder layer at a time (parity/stream.py).

For a quantised side the yardstick is the error the caller allows (``atol`` and/or
``kl_limit``), not float32's 1e-4; without either such a pair is refused. Greedy tokens of a
quantised model legitimately differ, so a mismatch there is a note, not a failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from ..checkpoints import CheckpointSource
from ..dtypes import DTYPES
from ..modeling import LlamaForCausalLM
from .compare import ParityReport, compare
from .stream import PortLayers, compare_streaming

# The fields that make two configs the same model; rope and token ids are left to the comparison.
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim",
)  # fmt: skip


def quantization(source: CheckpointSource) -> str | None:
    """The quantised block types a GGUF holds ("Q4_1", "Q4_1, Q6_K"), None for float weights."""
    if source.format != "gguf":
        return None
    from gguf import GGMLQuantizationType, GGUFReader

    floats = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    types = {t.tensor_type for t in GGUFReader(source.files[0]).tensors} - floats
    return ", ".join(sorted(GGMLQuantizationType(t).name for t in types)) or None


def check_pair(a: CheckpointSource, b: CheckpointSource, dtype: str, atol: float | None, kl_limit: float | None) -> list[str]:
    """The quantised sides, described ("<path> holds Q4_1 blocks"), after checking the pair can be
    compared: ValueError when the two configs describe different models, or a side is quantised
    (or the dtype low precision) and neither atol nor kl_limit says what error to allow."""
    differ = [f"{k} {getattr(a.config, k)} vs {getattr(b.config, k)}" for k in SHAPE_FIELDS
              if getattr(a.config, k) != getattr(b.config, k)]  # fmt: skip
    if differ:
        raise ValueError(f"{a.location} and {b.location} are not one model: {'; '.join(differ)}")
    quantised = [f"{s.location} holds {q} blocks" for s in (a, b) if (q := quantization(s)) is not None]
    if (quantised or dtype != "float32") and atol is None and kl_limit is None:
        why = "; ".join(quantised) or f"dtype={dtype!r} has no float32 yardstick here"
        raise ValueError(
            f"{why}: give the error you allow (atol and/or kl_limit; --atol / --kl-max in llama-port parity)"
        )
    return quantised


def compare_checkpoints(
    a: CheckpointSource,
    b: CheckpointSource,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn: str = "sdpa",
    stream: bool = False,
    generation_input_ids: Tensor | None = None,
    max_new_tokens: int = 32,
    atol: float | None = None,
    kl_limit: float | None = None,
    allow_token_mismatch: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ParityReport:
    """``a`` (in the report's "ours" place) against ``b`` (the "reference"), both run by llama_port.

    Arguments as compare's; stream: layer by layer (progress as compare_streaming's). ValueError
    as check_pair's.
    """
    quantised = check_pair(a, b, dtype, atol, kl_limit)

    allowed = allow_token_mismatch or bool(quantised)
    timings: dict[str, float] = {}
    if stream:
        report = compare_streaming(
            PortLayers(a, dtype, device, attn), PortLayers(b, dtype, device, attn), input_ids, attention_mask,
            dtype=dtype, generation_input_ids=generation_input_ids, max_new_tokens=max_new_tokens, atol=atol,
            kl_limit=kl_limit, allow_token_mismatch=allowed, progress=progress,
        )
    else:
        models = []
        for side, source in (("load A", a), ("load B", b)):
            started = time.perf_counter()
            models.append(LlamaForCausalLM.from_pretrained(
                source, dtype=DTYPES[dtype], device=device, attn_implementation=attn, progress=False
            ).eval())  # fmt: skip
            timings[side] = time.perf_counter() - started
        report = compare(
            *models, input_ids, attention_mask, generation_input_ids=generation_input_ids,
            max_new_tokens=max_new_tokens, dtype=dtype, atol=atol, kl_limit=kl_limit, allow_token_mismatch=allowed,
        )
    report.mode, report.checkpoint, report.against = "against", str(a.location), str(b.location)
    report.timings = timings | report.timings
    report.notes.insert(0, f"A ({a.format}) against B ({b.format}): each read by llama_port's reader of its "
                           "format, both run by llama_port's model; what differs is the weights")  # fmt: skip
    if quantised:
        report.notes.append(f"{'; '.join(quantised)}: judged by the allowed error, greedy tokens may differ")
    return report
