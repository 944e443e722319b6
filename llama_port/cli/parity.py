"""``llama-port parity``: load a checkpoint into llama_port and into transformers' own loader, run
llama_port.parity.compare on prompts plus a random left-padded batch, print and write the report.

Exit codes: 0 passed, 1 failed; bad usage or an unreadable checkpoint raise ValueError /
FileNotFoundError, which main() turns into exit code 2.
"""

from __future__ import annotations

import argparse
import os
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
        _check_batch_fits(args, source.config)
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
    if args.plot == "-":
        raise ValueError("--plot needs a file path (a PNG), not '-'")
    for flag in ("json", "plot"):
        value = getattr(args, flag)
        if value and value != "-":
            _check_writable(f"--{flag}", Path(value))


def _check_writable(flag: str, path: Path) -> None:
    """Before the run, not after it: the report's file must be one we can write."""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: folder {folder} does not exist")
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable here")


def _check_batch_fits(args: argparse.Namespace, config: Any) -> None:
    """Refuse, before loading anything, a random batch longer than the model's context or larger
    than the memory it would take (ValueError naming the flag, the bound and the estimate)."""
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the checkpoint's max_position_embeddings={config.max_position_embeddings}"
        )
    rows = args.batch + len(args.prompt or DEFAULT_PROMPTS)
    needed = _parity_bytes(config, rows, args.seq_len, models=3 if args.dtype in LOW_PRECISION_DTYPES else 2)
    available = _available_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"--batch {args.batch} x --seq-len {args.seq_len} needs about {needed / 2**30:.1f} GiB for the weights, "
            f"logits and per-layer states of the compared models; {available / 2**30:.1f} GiB is available. "
            "Lower --batch or --seq-len"
        )


def _parity_bytes(config: Any, rows: int, seq_len: int, models: int) -> int:
    """A floor on compare()'s memory, in float32: every model's weights, its logits (B, T, V) and its
    per-layer hidden states (L + 3 probes of (B, T, C)), plus the float64 KL of one logits copy."""
    hidden, heads = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = hidden * (2 * heads + 2 * kv) + 3 * hidden * config.intermediate_size
    weights = config.vocab_size * hidden * 2 + config.num_hidden_layers * layer
    tokens = rows * seq_len
    activations = tokens * (config.vocab_size + (config.num_hidden_layers + 3) * hidden)
    return 4 * models * (weights + activations) + 8 * 2 * tokens * config.vocab_size


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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
