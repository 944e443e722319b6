"""Decode tokens/s and prefill time of llama_port's generate() against transformers', in one run.

Both libraries run in one process, on the same checkpoint, dtype, device and thread count,
interleaving the configurations on every repeat so that a change in machine load hits all of them
alike, and the report holds medians. Decode tokens/s is timed by a streamer from the first new
token to the last, so it excludes the prefill, identically for both libraries; prefill is the time
of a ``generate(max_new_tokens=1)`` call on a long prompt. ``llama-port bench`` runs it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor

from .streamers import TimingStreamer

BENCH_PROMPT = "The history of the printing press begins"


@dataclass
class BenchRow:
    """One configuration's medians over the repeats."""

    name: str
    decode_tokens_per_s: float
    prefill_ms: float
    same_tokens: bool | None = None  # greedy tokens equal to transformers' (dynamic cache)
    decode_runs: list[float] = field(default_factory=list)
    prefill_runs: list[float] = field(default_factory=list)


@dataclass
class BenchReport:
    checkpoint: str
    dtype: str
    device: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens: int
    repeats: int
    compile_s: float | None
    rows: list[BenchRow]

    def row(self, name: str) -> BenchRow:
        return next(r for r in self.rows if r.name == name)


HF_DYNAMIC = "transformers generate (DynamicCache)"
HF_STATIC = "transformers generate (static cache)"
OURS_DYNAMIC = "llama_port generate (dynamic cache)"
OURS_STATIC = "llama_port generate (static cache)"
OURS_COMPILED = "llama_port generate (static cache, compile=True)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_decode(generate: Callable[[TimingStreamer], Tensor]) -> tuple[float, Tensor]:
    streamer = TimingStreamer()
    output = generate(streamer)
    return streamer.decode_tokens_per_s(), output


def _timed_prefill(generate: Callable[[], Tensor], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    generate()
    _synchronize(device)
    return (time.perf_counter() - start) * 1000


def benchmark_generation(
    ours: Any,
    reference: Any,
    prompt_ids: Tensor,
    new_tokens: int = 128,
    prefill_tokens: int = 512,
    repeats: int = 3,
    compile: bool = True,
    checkpoint: str = "",
    log: Callable[[str], None] = lambda message: None,
) -> BenchReport:
    """Greedy decode tokens/s after ``prompt_ids`` (1, T) and prefill ms for ``prefill_tokens``
    random ids, for transformers' generate (dynamic and static cache) and ours (dynamic, static,
    static + compile), each the median of ``repeats`` interleaved runs. Every run generates exactly
    ``new_tokens`` (no end-of-sequence stop on either side)."""
    device = ours.device
    prompt_ids = prompt_ids.to(device)
    generator = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, ours.config.vocab_size, (1, prefill_tokens), generator=generator).to(device)

    def hf_decode(cache: str | None) -> Callable[[TimingStreamer], Tensor]:
        return lambda streamer: reference.generate(
            prompt_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
            cache_implementation=cache, streamer=streamer,
        )

    def hf_prefill(cache: str | None) -> Callable[[], Tensor]:
        return lambda: reference.generate(
            long_ids, max_new_tokens=1, do_sample=False, eos_token_id=[], cache_implementation=cache
        )

    def ours_decode(cache: str, compiled: bool) -> Callable[[TimingStreamer], Tensor]:
        return lambda streamer: ours.generate(
            prompt_ids, max_new_tokens=new_tokens, eos_token_id=[], cache_implementation=cache,
            streamer=streamer, compile=compiled,
        )

    def ours_prefill(cache: str) -> Callable[[], Tensor]:
        return lambda: ours.generate(long_ids, max_new_tokens=1, eos_token_id=[], cache_implementation=cache)

    configs: list[tuple[str, Callable[[TimingStreamer], Tensor], Callable[[], Tensor]]] = [
        (HF_DYNAMIC, hf_decode(None), hf_prefill(None)),
        (HF_STATIC, hf_decode("static"), hf_prefill("static")),
        (OURS_DYNAMIC, ours_decode("dynamic", False), ours_prefill("dynamic")),
        (OURS_STATIC, ours_decode("static", False), ours_prefill("static")),
    ]
    compile_s = None
    if compile:
        log("compiling our decode step (inductor, once for these shapes)")
        start = time.perf_counter()
        ours_decode("static", True)(TimingStreamer())
        compile_s = time.perf_counter() - start
        configs.append((OURS_COMPILED, ours_decode("static", True), ours_prefill("static")))

    log("warm-up")
    for _, decode, prefill in configs:  # first calls allocate, fill caches, load kernels
        decode(TimingStreamer())
        prefill()

    decode_runs: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    prefill_runs: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    outputs: dict[str, Tensor] = {}
    for repeat in range(repeats):
        log(f"repeat {repeat + 1}/{repeats}")
        for name, decode, prefill in configs:
            tokens_per_s, outputs[name] = _timed_decode(decode)
            decode_runs[name].append(tokens_per_s)
            prefill_runs[name].append(_timed_prefill(prefill, device))

    reference_tokens = outputs[HF_DYNAMIC]
    rows = [
        BenchRow(
            name=name,
            decode_tokens_per_s=statistics.median(decode_runs[name]),
            prefill_ms=statistics.median(prefill_runs[name]),
            same_tokens=None if name == HF_DYNAMIC else bool(torch.equal(outputs[name], reference_tokens)),
            decode_runs=decode_runs[name],
            prefill_runs=prefill_runs[name],
        )
        for name, _, _ in configs
    ]
    return BenchReport(
        checkpoint=checkpoint,
        dtype=str(ours.dtype).removeprefix("torch."),
        device=str(device),
        threads=torch.get_num_threads(),
        prompt_tokens=prompt_ids.shape[1],
        new_tokens=new_tokens,
        prefill_tokens=prefill_tokens,
        repeats=repeats,
        compile_s=compile_s,
        rows=rows,
    )


def print_bench_report(report: BenchReport, file: TextIO | None = None) -> None:
    """A rich table (to ``file``, default stdout): decode tokens/s and prefill ms per configuration,
    with ratios to transformers' default (DynamicCache) and to its best configuration."""
    from rich.console import Console
    from rich.table import Table

    file = sys.stdout if file is None else file

    hf_rows = [report.row(HF_DYNAMIC), report.row(HF_STATIC)]
    base = hf_rows[0]
    best_decode = max(r.decode_tokens_per_s for r in hf_rows)
    best_prefill = min(r.prefill_ms for r in hf_rows)
    table = Table(
        title=(
            f"greedy decode of {report.new_tokens} tokens after a {report.prompt_tokens}-token prompt; "
            f"prefill of {report.prefill_tokens} tokens\n{report.checkpoint}\n{report.dtype} on "
            f"{report.device}, torch.set_num_threads({report.threads}) for both, median of {report.repeats}"
        )
    )
    for column in ("configuration", "decode tok/s", "x HF dynamic", "x HF best", "prefill ms",
                   "x HF dynamic", "x HF best", "same tokens"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for r in report.rows:
        table.add_row(
            r.name,
            f"{r.decode_tokens_per_s:.1f}",
            f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}",
            f"{r.decode_tokens_per_s / best_decode:.2f}",
            f"{r.prefill_ms:.0f}",
            # prefill: a ratio above 1 means faster (transformers' time / ours)
            f"{base.prefill_ms / r.prefill_ms:.2f}",
            f"{best_prefill / r.prefill_ms:.2f}",
            "-" if r.same_tokens is None else ("yes" if r.same_tokens else "NO"),
        )
    console = Console(file=file, width=max(Console(file=file).width, 150))
    console.print(table)
    if report.compile_s is not None:
        console.print(f"compile (first call of the compiled decode step): {report.compile_s:.1f} s")
    console.print("prefill ratios: transformers' time / this configuration's (above 1: faster)")
