"""torch.compile settings for the single-token decode step (what ``generate(compile=...)`` runs),
and its persistent cache across processes (compile_cache.py: one entry per model, weights and
shapes)."""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .compile_cache import CachedStep, cache_directory, step_key, step_key_fields
from .decoding import decode_step

# Inductor options for the decode step off CUDA, one set per compile mode.
#
# A one-token step is a chain of matrix-vector products whose speed is how fast the weights stream
# from memory.
#
# "default" (compile=True): no freezing, no prepacking, MKL's kernels (in half precision inductor's own
# reductions instead: DECOMPOSED_PRODUCTS_OPTIONS below), no autotuning. The weights
# stay inputs of the graph (so a weight changed in place after compiling is seen), inductor fuses
# everything between the products, and all it makes is stored by its FX graph cache (and our
# artifact file): a second process on the same checkpoint loads the step instead of compiling it
# (compile_cache.py; measured in the README). Freezing bought nothing here (SmolLM2-135M fp32, 2
# threads: 34.4-36.4 tok/s frozen, 35.0-36.4 not) and cost about 8 s of compiling and 4 s of
# every second process; it also made the mode depend on the process's history: inductor registers its
# weight-prepacking passes once, at the first frozen compile, if prepacking is on then
# (freezing_patterns.lazy_init), and applies them to every later frozen graph, so a frozen "default"
# step after a "max-autotune" one was prepacked and uncacheable, and a "max-autotune" step after a
# frozen "default" one was never prepacked.
#
# "max-autotune" (compile="max-autotune"): the weights frozen into the graph as constants, which
# inductor prepacks (oneDNN) for its C++ GEMM template, vectorised micro-kernels over the packed
# weights, which max_autotune enables; MKL (ATEN) is left out of the candidates on purpose:
# autotuning times each candidate on warm caches, where MKL often wins, but the real step streams
# the weights from DRAM. Measured on the 2-core AVX-512 machine (SmolLM2-135M, README): 2.0x the
# default mode in bfloat16, 1.6x for int8, 1.06x in float32 (where the template is level with MKL). Its
# price: a minute or more of compiling in *every* process, because the oneDNN-packed weights are
# tensors inductor's FX graph cache cannot store ("mkldnn tensors unpickleable": it bypasses the
# cache; AOTAutograd's cache refuses frozen graphs too), and the C++ template is only offered when
# that prepacking is on (torch 2.13's use_cpp_gemm_template). Weights changed after compiling are
# not seen until torch._dynamo.reset(). Its kernels are launched from a C++ wrapper (cpp_wrapper)
# instead of Python's, which took 2.7 ms of a 27.8 ms fp32 step (profiled): max-autotune decodes
# 9 % faster with it in bfloat16 (59.3 -> 64.6 tok/s) and 7 % for int8 (79.4 -> 85.3), for 17-27 s
# more compiling. In the default mode it gained nothing measurable and tripled the first compile
# (102 s), so it is off there.
CPU_COMPILE_MODES: dict[str, dict[str, object]] = {
    "default": {"freezing": False},
    "max-autotune": {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP", "cpp_wrapper": True},
}
COMPILE_MODES = tuple(CPU_COMPILE_MODES)
# A "default" step of a bfloat16 or float16 model also runs inductor's decompose_mm_pass: each
# one-row product (batch 1) becomes a multiply and a sum that inductor fuses into its own
# vectorised C++ reduction (float32 accumulation), in place of MKL's half-precision kernel, which
# streams about 12 GB/s at one row. Measured on SmolLM2-135M bf16, 2 threads: 32 -> 45.6 tok/s
# (README). In float32 it was level with MKL (34.2 against 33.6), so float32 keeps MKL's
# arithmetic; in max-autotune the C++ template is as fast (65.9 against 64.9). The pass's CPU
# size limits (2048 rows and columns) are module globals read once at import, so while the step
# runs they are raised to cover the head too (_decomposed_row_products).
DECOMPOSED_PRODUCTS_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}
DECOMPOSED_CPU_DEFAULT_OPTIONS = {**CPU_COMPILE_MODES["default"], **DECOMPOSED_PRODUCTS_OPTIONS}
DECOMPOSED_PRODUCT_DTYPES = (torch.bfloat16, torch.float16)
# Modes whose CPU step PyTorch 2.13 cannot keep in its caches (above): they compile in every
# process, so no cache entry is keyed or written for them; the first call says why.
UNCACHEABLE_CPU_MODES = {
    "max-autotune": "compile='max-autotune' compiles in every process: PyTorch cannot cache its prepacked weights",
}
# Where the C++ template cannot compile a product (no candidate left), retry once with MKL allowed.
CPU_COMPILE_FALLBACK_OPTIONS = {**CPU_COMPILE_MODES["max-autotune"], "max_autotune_gemm_backends": "CPP,ATEN"}
# A compiled step is specialised to the cache length; rounding it up lets prompts of different
# lengths share one graph (the extra slots stay masked).
COMPILED_CACHE_LEN_MULTIPLE = 256

_COMPILED_DECODE_STEPS: dict[tuple[str, str], Callable[..., Tensor]] = {}
# The cache entry of each (model, batch size, cache length, mode) a compiled step met in this process.
_CACHED_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int, str], CachedStep]] = weakref.WeakKeyDictionary()


def compile_mode(compile: bool | str) -> str | None:
    """generate()'s ``compile`` argument -> a mode of COMPILE_MODES, or None (not compiled);
    anything else is a ValueError listing what is valid."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if isinstance(compile, str) and compile in CPU_COMPILE_MODES:
        return compile
    raise ValueError(f"compile={compile!r}; expected True, False or one of {list(COMPILE_MODES)}")


def compiled_decode_step(device_type: str, mode: str = "default") -> Callable[..., Tensor]:
    """``decode_step`` under torch.compile, whole-graph, static shapes: CUDA graphs
    ("reduce-overhead") on CUDA, ``CPU_COMPILE_MODES[mode]`` elsewhere. Built once per device
    type and mode; dynamo keeps a graph per model and shapes. Every call runs with the persistent
    compile cache of its (model, shapes, mode) entry (compile_cache.py)."""
    if (device_type, mode) not in _COMPILED_DECODE_STEPS:
        step_fn = _own_code(decode_step, f"{device_type}_{mode}".replace("-", "_"))
        if device_type == "cuda":
            compiled = torch.compile(step_fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
            step = _with_compile_cache(compiled, mode)
        else:
            compiled = torch.compile(step_fn, fullgraph=True, dynamic=False)
            step = _with_inductor_config(compiled, mode)
        _COMPILED_DECODE_STEPS[device_type, mode] = step
    return _COMPILED_DECODE_STEPS[device_type, mode]


def _own_code(fn: Callable[..., Tensor], tag: str) -> Callable[..., Tensor]:
    """A copy of ``fn`` with a code object of its own. Dynamo keeps compiled graphs on the code
    object, and its guards do not cover inductor's (patched, global) config, so two modes compiling
    one function would share whichever graph was compiled first: "max-autotune" after "default" ran
    the default graph (seen in llama-port bench: 4 s "compiles", default speed)."""
    name = f"{fn.__name__}_{tag}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def cached_step_for(model: nn.Module, input_ids: Tensor, cache: object, mode: str) -> CachedStep:
    """The cache entry for ``model`` decoding a batch like ``input_ids`` (B, 1) over ``cache`` (a
    StaticCache) in ``mode``, made once per model, shapes and mode in a process: its options
    (``step_options``) and key are resolved then, not per step (for a frozen graph the key hashes
    the weights). A mode of UNCACHEABLE_CPU_MODES off CUDA gets an entry with no directory:
    nothing is keyed, read or written."""
    entries = _CACHED_STEPS.setdefault(model, {})
    shapes = (input_ids.shape[0], cache.max_cache_len, mode)
    if shapes not in entries:
        device_type = input_ids.device.type
        options = step_options(device_type, mode, model.dtype)
        uncached_reason = UNCACHEABLE_CPU_MODES.get(mode) if device_type != "cuda" else None
        if uncached_reason is not None:
            entries[shapes] = CachedStep("", None, options=options, uncached_reason=uncached_reason)
        else:
            fields = step_key_fields(model, shapes[0], shapes[1], device_type, options)
            entries[shapes] = CachedStep(step_key(fields), cache_directory(), fields, options=options)
    return entries[shapes]


def _with_compile_cache(fn: Callable[..., Tensor], mode: str) -> Callable[..., Tensor]:
    """``fn`` (the compiled step) called through its (model, shapes) entry's persistent cache."""

    def run(*args: object) -> Tensor:
        return cached_step_for(args[0], args[1], args[5], mode).call(fn, args)

    return run


def step_options(device_type: str, mode: str, dtype: torch.dtype) -> dict[str, object]:
    """What a step of a ``dtype`` model compiles under in ``mode``: torch.compile's
    "reduce-overhead" on CUDA, else inductor options (``cpu_compile_options``)."""
    return {"mode": "reduce-overhead"} if device_type == "cuda" else cpu_compile_options(mode, dtype)


def cpu_compile_options(mode: str, dtype: torch.dtype) -> dict[str, object]:
    """The inductor options of a CPU step in ``mode`` for a model of ``dtype``: CPU_COMPILE_MODES[mode],
    or DECOMPOSED_CPU_DEFAULT_OPTIONS (with DECOMPOSED_PRODUCTS_OPTIONS) for a half-precision "default" step."""
    if mode == "default" and dtype in DECOMPOSED_PRODUCT_DTYPES:
        return DECOMPOSED_CPU_DEFAULT_OPTIONS
    return CPU_COMPILE_MODES[mode]


@contextlib.contextmanager
def _decomposed_row_products(options: dict[str, object]) -> Iterator[None]:
    """For a step compiled under DECOMPOSED_CPU_DEFAULT_OPTIONS: inductor's decompose_mm_pass takes one-row
    products of any size for the block (its CPU limits, module globals read at import, are raised
    and restored after). A torch without those globals keeps its own limits."""
    if options is not DECOMPOSED_CPU_DEFAULT_OPTIONS:
        yield
        return
    from torch._inductor.fx_passes import decompose_mem_bound_mm as decompose

    name = "cpu_max_other_dimension_decomposition"
    if not hasattr(decompose, name):
        yield
        return
    previous = getattr(decompose, name)
    setattr(decompose, name, sys.maxsize)
    try:
        yield
    finally:
        setattr(decompose, name, previous)


def _with_inductor_config(fn: Callable[..., Tensor], mode: str) -> Callable[..., Tensor]:
    """``fn`` run with inductor's global config patched by its entry's options (``cpu_compile_options``,
    resolved once per entry; compilation happens lazily, inside a call) and the persistent compile
    cache; in "max-autotune", falling back once to CPU_COMPILE_FALLBACK_OPTIONS if compiling fails. Not
    torch.compile(options=...): with these options passed there the step ran at eager speed, as if
    freezing were off (torch 2.13), while the same options set globally give the 2x."""
    import torch._inductor.config as inductor_config
    from torch._inductor.exc import InductorError

    fallen_back = False

    def call(entry: CachedStep, options: dict[str, object], args: tuple[object, ...]) -> Tensor:
        with inductor_config.patch(options), _decomposed_row_products(options):
            return entry.call(fn, args)

    def run(*args: object) -> Tensor:
        nonlocal fallen_back
        entry = cached_step_for(args[0], args[1], args[5], mode)
        if fallen_back:
            return call(entry, CPU_COMPILE_FALLBACK_OPTIONS, args)
        try:
            return call(entry, entry.options, args)
        except InductorError as err:  # raised while compiling, never by a compiled graph running
            if mode != "max-autotune":
                raise
            warnings.warn(f"compiling the decode step failed ({err}); retrying with MKL allowed", stacklevel=2)
            fallen_back = True
            return call(entry, CPU_COMPILE_FALLBACK_OPTIONS, args)

    return run
