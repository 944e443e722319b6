"""Decode tokens/s and prefill time of every configuration ``llama-port bench`` runs, in one run.

The configurations (``BenchCase``): transformers' generate in fp32 and bf16; llama_port's generate
in fp32 and bf16, default and compiled (static cache, ``compile=True``), and int8; llama.cpp's
llama-bench on the same weights as GGUF F32, BF16 and Q8_0. All run in one process (llama.cpp in a
child per run), on the same checkpoint, device and thread count, interleaving the configurations
on every repeat so that a change in machine load hits all of them alike; the report holds medians,
and the load average at the start and the end says how quiet the machine was.

How each number is taken: decode tokens/s by a streamer from the first new token to the last (the
prefill left out, identically for both libraries); prefill as the time of a
``generate(max_new_tokens=1)`` call on a long random prompt; llama.cpp's as llama-bench reports
them (``tg``: generation from an empty context; ``pp``: one prompt batch). The bandwidth limit is
measured on the spot (``measure_read_bandwidth``: the best of several whole reads of a large
buffer) and divided by the bytes of weights one token reads (``decode_bytes_per_token``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from .llama_cpp import GGUF_TYPES, LlamaCppError, LlamaCppTools, run_llama_bench
from .streamers import TimingStreamer

BENCH_PROMPT = "The history of the printing press begins"
# Bytes per weight of each GGUF type llama.cpp runs (Q8_0: blocks of 32 int8 values and an fp16 scale).
GGUF_BYTES_PER_WEIGHT = {"F32": 4.0, "BF16": 2.0, "Q8_0": 34 / 32}


@dataclass
class RunResult:
    """One timed run of a configuration: decode tokens/s, prefill ms, and the greedy tokens (None
    for llama.cpp, whose tokens are not returned)."""

    decode_tokens_per_s: float
    prefill_ms: float
    tokens: Tensor | None = None


@dataclass
class BenchCase:
    """A configuration to run: ``run`` does one timed decode + prefill; ``warmup`` the untimed
    first call (where compile=True compiles: its time is reported as ``first_call_s``).
    ``bytes_per_token``: weight bytes one decode step reads (for the bandwidth limit)."""

    name: str
    library: str  # "transformers", "llama_port" or "llama.cpp"
    precision: str  # "fp32", "bf16" or "int8"
    run: Callable[[], RunResult]
    warmup: Callable[[], None]
    bytes_per_token: float | None = None
    compiled: bool = False
    prefill_tokens: int = 0
    skip_errors: tuple[type[Exception], ...] = ()  # a warm-up raising one of these skips the case


@dataclass
class BenchRow:
    """One configuration's medians over the repeats, and its ratios: to transformers fp32, to
    llama.cpp at the same precision, to the memory-bandwidth limit."""

    name: str
    library: str
    precision: str
    decode_tokens_per_s: float
    prefill_ms: float
    prefill_tokens_per_s: float
    same_tokens: bool | None = None  # greedy tokens equal to transformers' at the same precision
    vs_transformers_fp32: float | None = None
    vs_llama_cpp: float | None = None
    limit_tokens_per_s: float | None = None
    fraction_of_limit: float | None = None
    first_call_s: float | None = None
    decode_runs: list[float] = field(default_factory=list)
    prefill_runs: list[float] = field(default_factory=list)


@dataclass
class BenchReport:
    checkpoint: str
    device: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens: int
    repeats: int
    bandwidth_gb_per_s: float | None
    load_average_start: list[float]
    load_average_end: list[float]
    rows: list[BenchRow]
    skipped: dict[str, str] = field(default_factory=dict)  # configuration -> why it did not run

    def row(self, name: str) -> BenchRow:
        return next(r for r in self.rows if r.name == name)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors_read_per_token(model: nn.Module, buffers: bool) -> list[Tensor]:
    """The parameters (and with ``buffers`` the buffers) one decode step reads whole, each shared
    tensor once: all but an untied input embedding, of which a step reads one row (tied, it is the
    head and read whole)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tensors = [*model.parameters(), *(model.buffers() if buffers else ())]
    unique = {id(t): t for t in tensors if not (t is embedding and head is not embedding)}
    return list(unique.values())


def decode_bytes_per_token(model: nn.Module) -> float:
    """Bytes of weights one decode step reads (``_tensors_read_per_token``, buffers included). The
    KV cache is left out (small beside the weights for short contexts)."""
    return float(sum(t.numel() * t.element_size() for t in _tensors_read_per_token(model, buffers=True)))


def weights_read_per_token(model: nn.Module) -> int:
    """The number of weights one decode step reads (its parameters, as decode_bytes_per_token,
    counted in values), for pricing other storage formats (GGUF_BYTES_PER_WEIGHT)."""
    return sum(t.numel() for t in _tensors_read_per_token(model, buffers=False))


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Memory read bandwidth in GB/s (1e9 bytes): the best of ``repeats`` whole-array reads of a
    ``megabytes`` MiB float32 buffer, each read both ways a decode step could (``sum()``, and a
    matrix-vector product over it as a (N / 4096, 4096) matrix: the step's own operation), on
    torch's current threads. A buffer much larger than the caches makes this DRAM's speed, the
    bound of a decode step; on a loaded machine it reads low, as the decode does."""
    device = torch.device(device)
    buffer = torch.ones(megabytes * 2**20 // 4 // 4096 * 4096, dtype=torch.float32, device=device)
    matrix, vector = buffer.view(-1, 4096), torch.ones(4096, device=device)
    reads = (buffer.sum, lambda: torch.mv(matrix, vector))
    for read in reads:  # fault the pages in and warm the code
        read()
    best = float("inf")
    for _ in range(repeats):
        for read in reads:
            _synchronize(device)
            start = time.perf_counter()
            read()
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def generate_case(
    name: str,
    library: str,
    precision: str,
    model: Any,
    prompt_ids: Tensor,
    long_ids: Tensor,
    new_tokens: int,
    compile_mode: str | None = None,
) -> BenchCase:
    """A configuration timing ``model.generate`` (ours or transformers': the same arguments, greedy,
    no end-of-sequence stop): decode after ``prompt_ids`` (1, T), prefill of ``long_ids`` (1, P).
    ``compile_mode`` (ours): the static cache with generate(compile=compile_mode), for decode and
    prefill alike."""
    device = prompt_ids.device
    compiled = compile_mode is not None
    extra: dict[str, Any] = dict(cache_implementation="static", compile=compile_mode) if compiled else {}

    def decode(streamer: TimingStreamer) -> Tensor:
        return model.generate(prompt_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                              streamer=streamer, **extra)

    def prefill() -> float:
        _synchronize(device)
        start = time.perf_counter()
        model.generate(long_ids, max_new_tokens=1, do_sample=False, eos_token_id=[], **extra)
        _synchronize(device)
        return (time.perf_counter() - start) * 1000

    def run() -> RunResult:
        streamer = TimingStreamer()
        tokens = decode(streamer)
        return RunResult(streamer.decode_tokens_per_s(), prefill(), tokens)

    def warmup() -> None:  # first calls allocate, fill caches, load kernels, compile
        decode(TimingStreamer())
        prefill()

    bytes_per_token = decode_bytes_per_token(model) if hasattr(model, "get_input_embeddings") else None
    return BenchCase(name, library, precision, run, warmup, bytes_per_token, compiled, long_ids.shape[1])


def llama_cpp_case(
    tools: LlamaCppTools, gguf: Path, precision: str, prefill_tokens: int, new_tokens: int, threads: int,
    weights_per_token: int, repetitions: int = 1,
) -> BenchCase:
    """A configuration running ``llama-bench`` on ``gguf`` once per round (``-r repetitions``, their
    mean): its generation speed as decode tokens/s, its prompt speed as prefill ms.
    ``weights_per_token``: weights a step reads (weights_read_per_token), priced at the GGUF type."""

    def run() -> RunResult:
        result = run_llama_bench(tools, gguf, prefill_tokens, new_tokens, threads, repetitions)
        return RunResult(result.gen_tokens_per_s, result.prompt_tokens / result.prompt_tokens_per_s * 1000)

    def warmup() -> None:  # reads the file into the page cache; llama-bench warms its own kernels
        run_llama_bench(tools, gguf, 8, 2, threads, 1)

    bytes_per_token = weights_per_token * GGUF_BYTES_PER_WEIGHT[GGUF_TYPES[precision]]
    name = f"llama.cpp {GGUF_TYPES[precision]} (llama-bench)"
    return BenchCase(name, "llama.cpp", precision, run, warmup, bytes_per_token, False, prefill_tokens, (LlamaCppError,))


def run_benchmark(
    cases: list[BenchCase],
    repeats: int = 3,
    bandwidth_gb_per_s: float | None = None,
    skipped: dict[str, str] | None = None,
    info: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> BenchReport:
    """Warm every case up once, then ``repeats`` rounds running each case once per round (so load
    changes hit all alike) -> a report of medians and ratios. A case whose warm-up raises one of
    its ``skip_errors`` is dropped into ``skipped`` with the reason. ``info``: the report's
    descriptive fields (checkpoint, device, prompt_tokens, new_tokens, prefill_tokens)."""
    info = dict(info or {})
    skipped = dict(skipped or {})
    load_start = list(os.getloadavg())
    first_call: dict[str, float] = {}
    for case in list(cases):
        log(f"warm-up: {case.name}" + (" (compiling, or loading the compile cache)" if case.compiled else ""))
        start = time.perf_counter()
        try:
            case.warmup()
        except case.skip_errors as err:
            skipped[case.name] = str(err).splitlines()[0]
            log(f"skipping {case.name}: {err}")
            cases = [c for c in cases if c is not case]
            continue
        first_call[case.name] = time.perf_counter() - start
    results: dict[str, list[RunResult]] = {case.name: [] for case in cases}
    for repeat in range(repeats):
        log(f"repeat {repeat + 1}/{repeats}")
        for case in cases:
            results[case.name].append(case.run())
    rows = [_row(case, results[case.name], first_call[case.name] if case.compiled else None) for case in cases]
    _add_ratios(rows, {case.name: case for case in cases}, results, bandwidth_gb_per_s)
    return BenchReport(
        checkpoint=str(info.get("checkpoint", "")),
        device=str(info.get("device", "cpu")),
        threads=torch.get_num_threads(),
        prompt_tokens=int(info.get("prompt_tokens", 0)),
        new_tokens=int(info.get("new_tokens", 0)),
        prefill_tokens=int(info.get("prefill_tokens", 0)),
        repeats=repeats,
        bandwidth_gb_per_s=bandwidth_gb_per_s,
        load_average_start=load_start,
        load_average_end=list(os.getloadavg()),
        rows=rows,
        skipped=skipped,
    )


def _row(case: BenchCase, runs: list[RunResult], first_call_s: float | None) -> BenchRow:
    decode = [r.decode_tokens_per_s for r in runs]
    prefill = [r.prefill_ms for r in runs]
    prefill_ms = statistics.median(prefill)
    return BenchRow(
        name=case.name, library=case.library, precision=case.precision,
        decode_tokens_per_s=statistics.median(decode), prefill_ms=prefill_ms,
        prefill_tokens_per_s=case.prefill_tokens / prefill_ms * 1000, first_call_s=first_call_s, decode_runs=decode, prefill_runs=prefill,
    )


def _add_ratios(
    rows: list[BenchRow], cases: dict[str, BenchCase], results: dict[str, list[RunResult]], bandwidth: float | None
) -> None:
    """Fill the ratio columns in place: x transformers fp32, x llama.cpp at the same precision, the
    bandwidth limit and the fraction of it reached, and whether the greedy tokens equal
    transformers' at the same precision (fp32 for int8 is not asked: quantised tokens may differ)."""
    by_key = {(r.library, r.precision): r for r in rows}
    reference = by_key.get(("transformers", "fp32"))
    for row in rows:
        case = cases[row.name]
        if reference is not None:
            row.vs_transformers_fp32 = row.decode_tokens_per_s / reference.decode_tokens_per_s
        llama_cpp = by_key.get(("llama.cpp", row.precision))
        if row.library == "llama_port" and llama_cpp is not None:
            row.vs_llama_cpp = row.decode_tokens_per_s / llama_cpp.decode_tokens_per_s
        if bandwidth is not None and case.bytes_per_token:
            row.limit_tokens_per_s = bandwidth * 1e9 / case.bytes_per_token
            row.fraction_of_limit = row.decode_tokens_per_s / row.limit_tokens_per_s
        same = by_key.get(("transformers", row.precision))
        tokens = results[row.name][-1].tokens
        if same is not None and same is not row and tokens is not None:
            theirs = results[same.name][-1].tokens
            row.same_tokens = theirs is not None and bool(torch.equal(tokens.cpu(), theirs.cpu()))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_bench_report(report: BenchReport, file: TextIO | None = None) -> None:
    """A rich table (to ``file``, default stdout): per configuration decode tokens/s, its ratios
    (to transformers fp32, to llama.cpp at the same precision, to the bandwidth limit), prefill
    ms, the first call's time for compiled rows, and token equality; then the bandwidth, the
    skipped configurations with their reasons, and the load averages."""
    from rich.console import Console
    from rich.table import Table

    file = sys.stdout if file is None else file
    table = Table(
        title=(
            f"greedy decode of {report.new_tokens} tokens after a {report.prompt_tokens}-token prompt; "
            f"prefill of {report.prefill_tokens} tokens\n{report.checkpoint}\n{report.device}, "
            f"{report.threads} threads for all, median of {report.repeats} interleaved runs"
        )
    )
    columns = ("configuration", "decode tok/s", "x HF fp32", "x llama.cpp", "limit tok/s", "of limit",
               "prefill ms", "first call s", "same tokens")
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for r in report.rows:
        table.add_row(
            r.name, f"{r.decode_tokens_per_s:.1f}", _ratio(r.vs_transformers_fp32), _ratio(r.vs_llama_cpp),
            "-" if r.limit_tokens_per_s is None else f"{r.limit_tokens_per_s:.0f}",
            "-" if r.fraction_of_limit is None else f"{r.fraction_of_limit:.0%}",
            f"{r.prefill_ms:.0f}", "-" if r.first_call_s is None else f"{r.first_call_s:.1f}",
            "-" if r.same_tokens is None else ("yes" if r.same_tokens else "NO"),
        )
    console = Console(file=file, width=max(Console(file=file).width, 160))
    console.print(table)
    if report.bandwidth_gb_per_s is not None:
        console.print(f"memory read bandwidth, measured now: {report.bandwidth_gb_per_s:.1f} GB/s; "
                      "limit tok/s = bandwidth / weight bytes read per token")
    for name, reason in report.skipped.items():
        console.print(f"skipped {name}: {reason}")
    start, end = (", ".join(f"{x:.2f}" for x in load) for load in (report.load_average_start, report.load_average_end))
    console.print(f"load average (1, 5, 15 min): {start} at the start, {end} at the end")
