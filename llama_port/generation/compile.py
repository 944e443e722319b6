"""torch.compile settings for the single-token decode step (what ``generate(compile=True)`` runs)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .decoding import decode_step

# Inductor options for the decode step off CUDA. A one-token step is a chain of matrix-vector
# products whose speed is how fast the weights stream from memory; MKL's sgemv reaches about half
# of the machine's read bandwidth there. Freezing folds the weights into the graph as constants, so
# inductor can prepack them for its C++ GEMM template (vectorised micro-kernels over the packed
# weights), which max_autotune enables. ATEN (MKL) is left out of the candidates on purpose:
# autotuning times each candidate on warm caches, where MKL often wins, but the real step streams
# 0.5 GB of weights from DRAM, where the template is about twice as fast (SmolLM2-135M on the
# 2-core AVX-512 benchmark machine: ~21 ms per token against ~42 ms with MKL's kernels picked).
# The price: a minute or so of compiling per set of shapes, and weights changed after compiling
# are not seen (torch._dynamo.reset() forgets the graphs).
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
# Where the C++ template cannot compile a product (no candidate left), retry once with MKL allowed.
CPU_COMPILE_FALLBACK_OPTIONS = {**CPU_COMPILE_OPTIONS, "max_autotune_gemm_backends": "CPP,ATEN"}
# A compiled step is specialised to the cache length; rounding it up lets prompts of different
# lengths share one graph (the extra slots stay masked).
COMPILED_CACHE_LEN_MULTIPLE = 256

_COMPILED_DECODE_STEPS: dict[str, Callable[..., Tensor]] = {}


def compiled_decode_step(device_type: str) -> Callable[..., Tensor]:
    """``decode_step`` under torch.compile, whole-graph, static shapes: CUDA graphs
    ("reduce-overhead") on CUDA, ``CPU_COMPILE_OPTIONS`` elsewhere. Built once per device type;
    dynamo keeps a graph per model and shapes."""
    if device_type not in _COMPILED_DECODE_STEPS:
        if device_type == "cuda":
            step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        else:
            step = _with_inductor_config(torch.compile(decode_step, fullgraph=True, dynamic=False), CPU_COMPILE_OPTIONS)
        _COMPILED_DECODE_STEPS[device_type] = step
    return _COMPILED_DECODE_STEPS[device_type]


def _with_inductor_config(fn: Callable[..., Tensor], options: dict[str, object]) -> Callable[..., Tensor]:
    """``fn`` run with inductor's global config patched by ``options`` (compilation happens lazily,
    inside a call), falling back once to CPU_COMPILE_FALLBACK_OPTIONS if compiling fails. Not
    torch.compile(options=...): with these options passed there the step ran at eager speed, as
    if freezing were off (torch 2.13), while the same options set globally give the 2x."""
    import torch._inductor.config as inductor_config
    from torch._inductor.exc import InductorError

    current = options

    def run(*args: object) -> Tensor:
        nonlocal current
        try:
            with inductor_config.patch(current):
                return fn(*args)
        except InductorError as err:  # raised while compiling, never by a compiled graph running
            if current == CPU_COMPILE_FALLBACK_OPTIONS:
                raise
            warnings.warn(f"compiling the decode step failed ({err}); retrying with MKL allowed", stacklevel=2)
            current = CPU_COMPILE_FALLBACK_OPTIONS
            with inductor_config.patch(current):
                return fn(*args)

    return run
