"""``llama-port generate``: stream the continuation of a prompt to stdout; tokens/s to stderr."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import load_tokenizer
from ..generation import CACHE_IMPLEMENTATIONS, TextStreamPrinter, eos_token_ids
from .common import (
    UsageError,
    add_checkpoint_argument,
    add_dtype_argument,
    add_threads_argument,
    add_tp_plan_argument,
    is_lead_process,
    load_model,
    open_source,
    set_threads,
    shared_seed,
)

NAME = "generate"
HELP = "stream text from a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k most likely tokens only (default: the checkpoint's "
                             "generation_config.json, else transformers' 50; 0: no limit)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample from the nucleus of this probability mass (default: the checkpoint's "
                             "generation_config.json, else 1: no limit)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler's private generator")
    add_dtype_argument(parser, "dtype the model runs in (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--cache", choices=CACHE_IMPLEMENTATIONS, default="static",
                        help="KV cache: static (preallocated, the fast path; default) or dynamic")
    parser.add_argument("--compile", action="store_true", help="torch.compile the single-token decode step")
    add_tp_plan_argument(parser)
    add_threads_argument(parser)


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


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    source = open_source(args.checkpoint)
    model = load_model(source, args.dtype, args.device, tp_plan=args.tp_plan)
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise UsageError(f"{source.root} has no tokenizer; generate needs one to turn --prompt into ids")
    input_ids = encode_prompt(tokenizer, args.prompt, args.chat).to(model.device)
    do_sample = args.temperature > 0
    lead = is_lead_process()  # under --tp-plan every rank generates the same tokens; rank 0 reports them
    if args.compile and lead:
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
        # The config's ids plus the tokenizer's: chat models end a turn with it.
        eos_token_id=eos_token_ids(model.config.eos_token_id, tokenizer.eos_token_id),
        cache_implementation=args.cache,
        streamer=printer,
        seed=shared_seed(args.seed) if do_sample else args.seed,
        compile=args.compile,
    )
    elapsed = time.perf_counter() - start
    new_tokens = output.shape[1] - input_ids.shape[1]
    # With --compile the first decode step compiles: time the decoding from the step after it.
    skip = 1 if args.compile else 0
    compiling = ""
    if args.compile and len(printer.times) > 1:
        compiling = f", compiling {printer.times[1] - printer.times[0]:.1f} s"
    if not lead:
        return 0
    print(
        f"{new_tokens} tokens in {elapsed:.2f} s: {printer.decode_tokens_per_s(skip):.1f} tokens/s decoding "
        f"(prompt {input_ids.shape[1]} tokens, {torch.get_num_threads()} threads{compiling})",
        file=sys.stderr,
    )
    return 0
