"""``llama-port parity``: load a checkpoint into llama_port and into transformers' own loader, run
llama_port.parity.compare on prompts plus a random left-padded batch, print and write the report.

Exit codes: 0 passed, 1 failed; bad usage or an unreadable checkpoint raise ValueError /
FileNotFoundError, which main() turns into exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..attention import BACKENDS, get_backend
from ..dtypes import LOW_PRECISION_DTYPES
from ..parity import (
    DEFAULT_PROMPTS,
    compare,
    load_checkpoint_tokenizer,
    load_reference,
    parity_batch,
    print_report,
    write_plot,
)
from .common import add_checkpoint_argument, add_dtype_argument, load_model, open_source

NAME = "parity"
HELP = "compare llama_port with transformers on a checkpoint, layer by layer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    add_dtype_argument(parser, "dtype both models run in (default float32; bf16/fp16 are judged against fp32)")
    parser.add_argument("--attn", choices=sorted(BACKENDS), default="sdpa",
                        help="attention backend, the same for both models (flash_reference: sdpa for the reference)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both models run (default cpu)")
    parser.add_argument("--prompt", nargs="+", default=None, help="prompt texts (default: a few built-in ones)")
    parser.add_argument("--seq-len", type=int, default=32, help="length of the random left-padded batch")
    parser.add_argument("--batch", type=int, default=2, help="rows of the random left-padded batch")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens both models generate")
    parser.add_argument("--atol", type=float, default=None,
                        help="fp32 pass bound on max |logit diff| (default 1e-4)")
    parser.add_argument("--ratio", type=float, default=None,
                        help="bf16/fp16 pass bound: our error / the reference's own error (default 2.0)")
    parser.add_argument("--allow-token-mismatch", action="store_true",
                        help="do not fail when greedy generations differ")
    parser.add_argument("--json", default=None, metavar="PATH|-", help="write the report as JSON ('-': stdout)")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of per-layer divergence")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    _check_args(args)
    json_to_stdout = args.json == "-"
    # With --json -, stdout carries the JSON alone: the table and progress go to stderr.
    out = Console(file=sys.stderr if json_to_stdout else sys.stdout, highlight=False)
    err_console = Console(file=sys.stderr, highlight=False)
    show_progress = not args.quiet and sys.stderr.isatty()
    started = time.perf_counter()
    reference_attn = get_backend(args.attn).reference_name

    with _Progress(err_console, show_progress) as progress, tempfile.TemporaryDirectory() as tmp:
        progress.step("finding the checkpoint")
        source = open_source(args.checkpoint)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            progress.step(f"loading the reference (transformers, {args.dtype}, {reference_attn})")
            reference = load_reference(source, args.dtype, args.device, reference_attn, Path(tmp))
            reference_fp32 = None
            if args.dtype in LOW_PRECISION_DTYPES:
                progress.step("loading the float32 reference (the yardstick for low precision)")
                reference_fp32 = load_reference(source, "float32", args.device, reference_attn, Path(tmp))
            progress.step(f"loading llama_port ({args.dtype}, {args.attn})")
            ours = load_model(source, args.dtype, args.device, args.attn)
            progress.step("loading the tokenizer")
            tokenizer = load_checkpoint_tokenizer(source)
        input_ids, attention_mask, generation_ids, notes = parity_batch(
            args.prompt or DEFAULT_PROMPTS, tokenizer, ours.config.vocab_size, ours.config.pad_token_id,
            args.batch, args.seq_len,
        )
        notes += [f"while loading: {w.message}" for w in caught if _is_own_warning(w)]
        progress.step(
            f"comparing on {input_ids.shape[0]} rows x {input_ids.shape[1]} tokens, "
            f"then {args.max_new_tokens} greedy tokens"
        )
        report = compare(
            ours,
            reference,
            input_ids,
            attention_mask,
            generation_input_ids=generation_ids,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            atol=args.atol,
            ratio=args.ratio,
            allow_token_mismatch=args.allow_token_mismatch,
            reference_fp32=reference_fp32,
        )
    report.checkpoint = str(source.location)
    report.notes = notes + report.notes
    if source.format == "meta":
        report.notes.append(
            "Meta checkpoint: transformers cannot read consolidated.*.pth, so the reference was loaded "
            "from llama_port's conversion of it and shares our Meta name mapping and permutations"
        )
    if args.dtype == "float32" and args.ratio is not None:
        report.notes.append("--ratio applies to bfloat16/float16 only; float32 is judged by --atol")
    if generation_ids is not None and args.max_new_tokens > 0:
        report.notes.append(f"greedy prompt: {(args.prompt or DEFAULT_PROMPTS)[0]!r}")

    print_report(report, out, elapsed=time.perf_counter() - started)
    if args.json == "-":
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    elif args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    if args.plot:
        write_plot(report, args.plot)
    return 0 if report.passed else 1


def _check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 1:
        raise ValueError(f"--seq-len {args.seq_len}; expected >= 1")
    if args.batch < 0:
        raise ValueError(f"--batch {args.batch}; expected >= 0")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}; expected >= 0")
    for flag in ("atol", "ratio"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise ValueError(f"--{flag} {value}; expected a positive number")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if args.attn == "flash_attention_2" and args.device != "cuda":
        raise ValueError("--attn flash_attention_2 needs --device cuda")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ValueError("--prompt: empty prompt text")
    for flag in ("json", "plot"):
        value = getattr(args, flag)
        if value and value != "-" and not Path(value).resolve().parent.is_dir():
            raise FileNotFoundError(f"--{flag} {value}: folder {Path(value).resolve().parent} does not exist")
    if args.plot == "-":
        raise ValueError("--plot needs a file path (a PNG), not '-'")


def _is_own_warning(w: warnings.WarningMessage) -> bool:
    """llama_port's loader warnings (worth a note), not third-party deprecation chatter."""
    return "llama_port" in str(w.filename) or not issubclass(w.category, (DeprecationWarning, FutureWarning))


class _Progress:
    """One rich status line on stderr that shows the current step; silent when disabled."""

    def __init__(self, console: Any, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.status = None
        self.current: str | None = None
        self.started = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.status = self.console.status("starting")
            self.status.__enter__()
        return self

    def step(self, message: str) -> None:
        self._finish_current()
        self.current, self.started = message, time.perf_counter()
        if self.status is not None:
            self.status.update(message + " ...")

    def _finish_current(self) -> None:
        if self.enabled and self.current is not None:
            self.console.print(f"[green]done[/] {self.current} ({time.perf_counter() - self.started:.1f}s)")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish_current()
        if self.status is not None:
            self.status.__exit__(exc_type, exc, tb)
