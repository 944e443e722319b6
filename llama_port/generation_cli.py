"""``llama-port generate`` (stream text from a checkpoint) and ``llama-port bench`` (decode tokens/s
and prefill time against transformers' generate). Called by cli.py with its argparse Namespace;
scripts/bench_generate.py runs the same bench.

The bench times both libraries in one process, on the same checkpoint, dtype, device and thread
count, interleaving the configurations on every repeat so that a change in machine load hits all of
them alike, and reports medians. Decode tokens/s is timed by a streamer from the first new token to
the last, so it excludes the prefill, identically for both libraries; prefill is the time of a
``generate(max_new_tokens=1)`` call on a long prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from .cli import UsageError

BENCH_PROMPT = "The history of the printing press begins"


# ------------------------------------------------------------------------------------ streamers
class TimingStreamer:
    """A generate() streamer (transformers' protocol) that timestamps every step's tokens.

    ``put`` gets the prompt first, then each new token; decode tokens/s is measured from the first
    new token to the last, so it leaves the prefill out."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def new_tokens(self) -> int:
        return len(self.times)

    def decode_tokens_per_s(self, skip: int = 0) -> float:
        """Tokens after the first (and ``skip`` more), per second of decoding; nan if too few.

        ``skip=1`` leaves out the first decode step, which is where compile=True compiles."""
        times = self.times[skip:]
        if len(times) < 2:
            return float("nan")
        return (len(times) - 1) / (times[-1] - times[0])


class TextStreamPrinter(TimingStreamer):
    """Prints the new text of a single sequence as its tokens arrive.

    Each step decodes the tokens generated so far and prints what was not printed yet; text ending
    in U+FFFD is held back, since byte-level BPE splits a multi-byte character over tokens."""

    def __init__(self, tokenizer: Any, file: TextIO | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.file = sys.stdout if file is None else file  # looked up now: tests swap sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def put(self, value: Tensor) -> None:
        was_prompt = not self.prompt_seen
        super().put(value)
        if was_prompt:
            return
        self.tokens.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._print(text)

    def end(self) -> None:
        self._print(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        print(file=self.file, flush=True)

    def _print(self, text: str) -> None:
        if len(text) > self.printed:
            print(text[self.printed :], end="", file=self.file, flush=True)
            self.printed = len(text)


# ------------------------------------------------------------------------------------- loading
def resolve_checkpoint_arg(checkpoint: str | None) -> str:
    """The CHECKPOINT argument, or the embedded SmolLM2 GGUF when it is omitted."""
    from .checkpoints import default_checkpoint

    return str(checkpoint) if checkpoint else str(default_checkpoint())


def load_model(checkpoint: str, dtype: str, device: str):
    """llama_port's LlamaForCausalLM from any supported checkpoint, in eval mode."""
    from .modeling import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device=device).eval()


def load_tokenizer_or_fail(checkpoint: str) -> Any:
    from .checkpoints import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    if tokenizer is None:
        raise UsageError(f"{checkpoint} has no tokenizer; generate needs one to turn --prompt into ids")
    return tokenizer


def load_transformers_model(checkpoint: str, dtype: str, device: str):
    """transformers' AutoModelForCausalLM for the same checkpoint (a .gguf file: its folder plus
    gguf_file=, as transformers wants), in eval mode."""
    import transformers

    path = Path(checkpoint)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        checkpoint = str(path.parent)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    return model.to(device).eval()


def eos_ids_for(model: Any, tokenizer: Any) -> list[int]:
    """The config's end-of-sequence ids plus the tokenizer's (chat models end turns with it)."""
    ids = model.config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> Tensor:
    """(1, T) ids of ``prompt``, wrapped in the tokenizer's chat template with ``chat``."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: this checkpoint's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UsageError("--prompt encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


def _set_threads(threads: int | None) -> None:
    """--threads: torch.set_num_threads for everything the command runs (None: torch's default)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads={threads}; expected >= 1")
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ generate
def run_generate_command(args: argparse.Namespace) -> int:
    """Stream the continuation of --prompt to stdout; tokens/s to stderr."""
    _set_threads(args.threads)
    checkpoint = resolve_checkpoint_arg(args.checkpoint)
    model = load_model(checkpoint, args.dtype, args.device)
    tokenizer = load_tokenizer_or_fail(checkpoint)
    input_ids = encode_prompt(tokenizer, args.prompt, args.chat).to(model.device)
    do_sample = args.temperature > 0
    if args.compile:
        print("compiling the decode step (the first call takes a minute or so on CPU)", file=sys.stderr)
    printer = TextStreamPrinter(tokenizer)
    start = time.perf_counter()
    output = model.generate(
        input_ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=do_sample,
        temperature=args.temperature if do_sample else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos_ids_for(model, tokenizer),
        cache_implementation=args.cache,
        streamer=printer,
        seed=args.seed,
        compile=args.compile,
    )
    elapsed = time.perf_counter() - start
    new_tokens = output.shape[1] - input_ids.shape[1]
    # With --compile the first decode step compiles: time the decoding from the step after it.
    skip = 1 if args.compile else 0
    compiling = ""
    if args.compile and len(printer.times) > 1:
        compiling = f", compiling {printer.times[1] - printer.times[0]:.1f} s"
    print(
        f"{new_tokens} tokens in {elapsed:.2f} s: {printer.decode_tokens_per_s(skip):.1f} tokens/s decoding "
        f"(prompt {input_ids.shape[1]} tokens, {torch.get_num_threads()} threads{compiling})",
        file=sys.stderr,
    )
    return 0


# --------------------------------------------------------------------------------------- bench
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


def run_bench_command(args: argparse.Namespace) -> int:
    """Load the checkpoint into both libraries, benchmark, print the table (and JSON with --json)."""
    if args.new_tokens < 2 or args.prefill_tokens < 1 or args.repeats < 1:
        raise UsageError("--new-tokens must be >= 2, --prefill-tokens and --repeats >= 1")
    _set_threads(args.threads)
    checkpoint = resolve_checkpoint_arg(args.checkpoint)

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    log(f"loading {checkpoint}")
    ours = load_model(checkpoint, args.dtype, args.device)
    reference = load_transformers_model(checkpoint, args.dtype, args.device)
    from .checkpoints import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    if tokenizer is not None:
        prompt_ids = torch.tensor([tokenizer(BENCH_PROMPT)["input_ids"]], dtype=torch.long)
    else:
        prompt_ids = torch.arange(1, 9)[None] % ours.config.vocab_size
    with torch.inference_mode():
        report = benchmark_generation(
            ours, reference, prompt_ids, args.new_tokens, args.prefill_tokens, args.repeats,
            compile=not args.no_compile, checkpoint=checkpoint, log=log,
        )
    print_bench_report(report)
    if args.json:
        text = json.dumps(asdict(report), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
