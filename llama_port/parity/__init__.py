"""Parity with transformers, measured: the comparison as a library.

    compare.py     compare() -> ParityReport: logit metrics, per-layer diffs, greedy tokens, verdict
    stream.py      compare_streaming(): the same report one decoder layer at a time; PortLayers (ours)
    against.py     compare_checkpoints(): two checkpoints of one model in different formats
    reference.py   the one loader of the reference (transformers') model, whole or ReferenceLayers
                   (layer by layer), and of its tokenizer
    inputs.py      the prompts and seeded random rows a check runs on
    report.py      rich tables and the per-layer plot

``llama-port parity`` (llama_port.cli.parity) puts them together for a checkpoint. Needs
transformers for the reference only; compare() takes any two models.
"""

from .against import check_pair, compare_checkpoints, quantization
from .compare import (
    LayerDiff,
    ParityReport,
    compare,
    exceeds_threshold,
    first_divergent,
    logit_metrics,
    weights_sha256,
)
from .inputs import DEFAULT_PROMPTS, left_pad, parity_batch, random_batch
from .reference import (
    ReferenceLayers,
    gguf_parse_cache,
    load_checkpoint_tokenizer,
    load_reference,
    transformers_quiet,
)
from .report import print_report, write_plot
from .stream import LayerStream, PortLayers, compare_streaming

__all__ = [
    "DEFAULT_PROMPTS",
    "LayerDiff",
    "LayerStream",
    "ParityReport",
    "PortLayers",
    "ReferenceLayers",
    "check_pair",
    "compare",
    "compare_checkpoints",
    "compare_streaming",
    "exceeds_threshold",
    "first_divergent",
    "gguf_parse_cache",
    "left_pad",
    "load_checkpoint_tokenizer",
    "load_reference",
    "logit_metrics",
    "parity_batch",
    "print_report",
    "quantization",
    "random_batch",
    "transformers_quiet",
    "weights_sha256",
    "write_plot",
]
