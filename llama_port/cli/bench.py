"""``llama-port bench``: decode tokens/s and prefill time against transformers' generate, in one run
(generation.benchmark)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints import load_tokenizer
from ..generation.benchmark import BENCH_PROMPT, benchmark_generation, print_bench_report
from ..parity import load_reference
from .common import UsageError, add_checkpoint_argument, add_dtype_argument, add_threads_argument, load_model, open_source, set_threads

NAME = "bench"
HELP = "decode tokens/s and prefill time against transformers' generate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    add_dtype_argument(parser, "dtype both libraries run in (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default cpu)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode run (default 128)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill runs (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode step (compiling takes minutes)")
    add_threads_argument(parser)
    parser.add_argument("--json", default=None, metavar="PATH|-", help="also write the report as JSON ('-': stdout)")


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint into both libraries, benchmark, print the table (and JSON with --json)."""
    if args.new_tokens < 2 or args.prefill_tokens < 1 or args.repeats < 1:
        raise UsageError("--new-tokens must be >= 2, --prefill-tokens and --repeats >= 1")
    set_threads(args.threads)
    source = open_source(args.checkpoint)

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    log(f"loading {source.location}")
    ours = load_model(source, args.dtype, args.device)
    reference = load_reference(source, args.dtype, args.device)
    tokenizer = load_tokenizer(source)
    if tokenizer is not None:
        prompt_ids = torch.tensor([tokenizer(BENCH_PROMPT)["input_ids"]], dtype=torch.long)
    else:
        prompt_ids = torch.arange(1, 9)[None] % ours.config.vocab_size
    with torch.inference_mode():
        report = benchmark_generation(
            ours, reference, prompt_ids, args.new_tokens, args.prefill_tokens, args.repeats,
            compile=not args.no_compile, checkpoint=str(source.location), log=log,
        )
    print_bench_report(report)
    if args.json:
        text = json.dumps(asdict(report), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
