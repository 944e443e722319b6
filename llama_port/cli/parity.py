"""``llama-port parity``: load a checkpoint into llama_port and into transformers' own loader, run
llama_port.parity.compare on prompts plus a random left-padded batch, print and write the report.
Under torchrun, ``--tp-plan auto`` compares our tensor-parallel model (every rank) with
transformers' whole model loaded single-process on each rank; rank 0 prints and writes the report.
``--stream`` (automatic when the two whole models would not fit in memory) compares one decoder
layer at a time (parity.compare_streaming); ``--against B`` compares the checkpoint with another
checkpoint of the same model in another format (parity.compare_checkpoints). ``--quantize int8``
loads ours weight-only int8 (from_pretrained(..., quantize="int8")) and judges it against
transformers' float model by ``--kl-max`` (required), reporting KL and top-1 agreement.

Exit codes: 0 passed, 1 failed; bad usage or an unreadable checkpoint raise ValueError /
FileNotFoundError, which main() turns into exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..attention import BACKENDS, get_backend
from ..checkpoints import CheckpointSource
from ..distributed import init_process_group_from_env
from ..dtypes import LOW_PRECISION_DTYPES
from ..parity import (
    DEFAULT_PROMPTS,
    ParityReport,
    PortLayers,
    ReferenceLayers,
    check_pair,
    compare,
    compare_checkpoints,
    compare_streaming,
    gguf_parse_cache,
    load_checkpoint_tokenizer,
    load_reference,
    parity_batch,
    print_report,
    write_plot,
)
from ..quantization import QUANTIZE_METHODS
from .common import add_checkpoint_argument, add_dtype_argument, add_tp_plan_argument, is_lead_process, load_model, open_source

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
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="greedy tokens both whole models generate (streaming: see --greedy-tokens)")
    parser.add_argument("--greedy-tokens", type=int, default=None, metavar="N",
                        help="greedy tokens when streaming (default 0: skipped, as each token streams every layer "
                             "of both models)")
    parser.add_argument("--against", default=None, metavar="CHECKPOINT",
                        help="compare CHECKPOINT with this other checkpoint of the same model in another format "
                             "(each read by its own format's reader, both run by llama_port): is the conversion "
                             "faithful?")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stream", dest="stream", action="store_true", default=None,
                      help="compare one decoder layer at a time (default: when two whole models would not fit)")
    mode.add_argument("--no-stream", dest="stream", action="store_false",
                      help="hold both whole models in memory even when they would not fit")
    parser.add_argument("--atol", type=float, default=None,
                        help="fp32 pass bound on max |logit diff| (default 1e-4); with --against on a quantised "
                             "checkpoint, the error you allow")
    parser.add_argument("--kl-max", dest="kl_limit", type=float, default=None, metavar="KL",
                        help="pass bound on the largest KL(reference || ours); with --against on a quantised "
                             "checkpoint, the error you allow (instead of or with --atol)")
    parser.add_argument("--ratio", type=float, default=None,
                        help="bf16/fp16 pass bound: our error / the reference's own error (default 2.0)")
    parser.add_argument("--quantize", choices=QUANTIZE_METHODS, default=None,
                        help="load ours quantized (int8: weight-only, per-channel scales) and judge it against "
                             "transformers' unquantized model by --kl-max (required); greedy tokens may differ")
    parser.add_argument("--allow-token-mismatch", action="store_true",
                        help="do not fail when greedy generations differ")
    parser.add_argument("--json", default=None, metavar="PATH|-", help="write the report as JSON ('-': stdout)")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of per-layer divergence")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_tp_plan_argument(parser)  # the reference is loaded whole, single-process, on every rank


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    _check_args(args)
    if args.tp_plan is not None:
        init_process_group_from_env(torch.device(args.device).type)  # now, so only rank 0 shows progress
    json_to_stdout = args.json == "-"
    # With --json -, stdout carries the JSON alone: the table and progress go to stderr.
    out = Console(file=sys.stderr if json_to_stdout else sys.stdout, highlight=False)
    err_console = Console(file=sys.stderr, highlight=False)
    show_progress = not args.quiet and sys.stderr.isatty() and is_lead_process()
    started = time.perf_counter()

    with _Progress(err_console, show_progress) as progress, tempfile.TemporaryDirectory() as tmp:
        progress.step("open", "finding the checkpoint" + ("s" if args.against else ""))
        source = open_source(args.checkpoint)
        other = open_source(args.against) if args.against is not None else None
        streamed = _streamed(args, source.config, err_console)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if other is not None:
                report, batch = _against(args, source, other, streamed, progress)
            elif streamed:
                report, batch = _stream(args, source, progress, Path(tmp))
            else:
                report, batch = _whole(args, source, progress, Path(tmp))
        batch.notes += [f"warning: {w.message}" for w in caught if _is_own_warning(w)]
    report.checkpoint = str(source.location)
    report.notes = batch.notes + report.notes
    report.timings = progress.timings | report.timings
    _add_notes(args, report, source, batch)

    if not is_lead_process():  # --tp-plan: every rank compared the same; rank 0 reports
        return 0 if report.passed else 1
    print_report(report, out, elapsed=time.perf_counter() - started)
    if args.json == "-":
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    elif args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    if args.plot:
        write_plot(report, args.plot)
    return 0 if report.passed else 1


@dataclass
class _Batch:
    """The compared batch (parity_batch's): ids and mask (B, L), the greedy prompt (1, T) or None, notes."""

    input_ids: Tensor
    attention_mask: Tensor
    generation_ids: Tensor | None
    notes: list[str]


def _batch(args: argparse.Namespace, tokenizer: Any, config: Any) -> _Batch:
    return _Batch(*parity_batch(
        args.prompt or DEFAULT_PROMPTS, tokenizer, config.vocab_size, config.pad_token_id, args.batch, args.seq_len
    ))  # fmt: skip


def _reference_side(
    args: argparse.Namespace, source: CheckpointSource, progress: _Progress, tmp: Path, load: Callable, how: str
) -> tuple[Any, Any, Any]:
    """(reference, its float32 yardstick in low precision or None, the tokenizer); ``load`` is
    load_reference or ReferenceLayers (the same arguments)."""
    reference_attn = get_backend(args.attn).reference_name
    with gguf_parse_cache():  # transformers' loads of a GGUF share one parse of it
        progress.step("reference", f"{how} the reference (transformers, {args.dtype}, {reference_attn})")
        reference = load(source, args.dtype, args.device, reference_attn, tmp)
        reference_fp32 = None
        if args.dtype in LOW_PRECISION_DTYPES:
            progress.step("reference fp32", f"{how} the float32 reference (the yardstick for low precision)")
            reference_fp32 = load(source, "float32", args.device, reference_attn, tmp)
        progress.step("tokenizer", "loading the tokenizer")
        tokenizer = load_checkpoint_tokenizer(source)
    return reference, reference_fp32, tokenizer


def _whole(args: argparse.Namespace, source: CheckpointSource, progress: _Progress, tmp: Path) -> tuple[ParityReport, _Batch]:
    """Both whole models in memory: transformers' (and its float32 yardstick) and ours."""
    reference, reference_fp32, tokenizer = _reference_side(args, source, progress, tmp, load_reference, "loading")
    progress.step("ours", f"loading llama_port ({args.dtype}, {args.attn})")
    ours = load_model(source, args.dtype, args.device, args.attn, args.tp_plan, quantize=args.quantize)
    batch = _batch(args, tokenizer, ours.config)
    progress.step(None, f"comparing on {_shape(batch)}, then {args.max_new_tokens} greedy tokens")
    report = compare(
        ours, reference, batch.input_ids, batch.attention_mask, generation_input_ids=batch.generation_ids,
        max_new_tokens=args.max_new_tokens, dtype=args.dtype, atol=args.atol, ratio=args.ratio,
        kl_limit=args.kl_limit, allow_token_mismatch=args.allow_token_mismatch or args.quantize is not None,
        reference_fp32=reference_fp32,
    )
    if args.quantize is not None:
        report.quantize = args.quantize
        report.notes.append(
            f"ours quantized {args.quantize} (weight-only, per-channel scales; {_not_converted(ours)}): judged by "
            "--kl-max against the unquantized reference, greedy tokens may differ"
        )
    return report, batch


def _not_converted(model: Any) -> str:
    skipped = model.config.quantization_config["modules_not_converted"]
    return f"not converted: {', '.join(skipped)}" if skipped else "every linear converted, lm_head included"


def _stream(args: argparse.Namespace, source: CheckpointSource, progress: _Progress, tmp: Path) -> tuple[ParityReport, _Batch]:
    """One decoder layer at a time: transformers' layers (ReferenceLayers) and ours (PortLayers)."""
    reference, reference_fp32, tokenizer = _reference_side(
        args, source, progress, tmp, ReferenceLayers, "opening layer by layer"
    )
    progress.step("ours", f"opening llama_port layer by layer ({args.dtype}, {args.attn})")
    ours = PortLayers(source, args.dtype, args.device, args.attn)
    batch = _batch(args, tokenizer, source.config)
    with progress.bar(None, f"comparing layer by layer on {_shape(batch)}", ours.num_hidden_layers) as advance:
        report = compare_streaming(
            ours, reference, batch.input_ids, batch.attention_mask, dtype=args.dtype,
            generation_input_ids=batch.generation_ids, max_new_tokens=args.greedy_tokens or 0, atol=args.atol,
            ratio=args.ratio, kl_limit=args.kl_limit, allow_token_mismatch=args.allow_token_mismatch,
            reference_fp32=reference_fp32, progress=advance,
        )
    return report, batch


def _against(
    args: argparse.Namespace, source: CheckpointSource, other: CheckpointSource, streamed: bool, progress: _Progress
) -> tuple[ParityReport, _Batch]:
    """CHECKPOINT against --against's checkpoint, both run by llama_port (parity.compare_checkpoints)."""
    with gguf_parse_cache():  # a GGUF's quantisation check and its tokenizer share one parse
        try:
            check_pair(source, other, args.dtype, args.atol, args.kl_limit)  # before loading anything
        except ValueError as err:
            raise ValueError(f"--against {args.against}: {err}") from err
        progress.step("tokenizer", "loading the tokenizer")
        tokenizer = load_checkpoint_tokenizer(source) or load_checkpoint_tokenizer(other)
    batch = _batch(args, tokenizer, source.config)
    greedy = (args.greedy_tokens or 0) if streamed else args.max_new_tokens
    how = "layer by layer" if streamed else "loading both"
    with progress.bar(None, f"comparing {how} on {_shape(batch)}", source.config.num_hidden_layers) as advance:
        report = compare_checkpoints(
            source, other, batch.input_ids, batch.attention_mask, dtype=args.dtype, device=args.device,
            attn=args.attn, stream=streamed, generation_input_ids=batch.generation_ids, max_new_tokens=greedy,
            atol=args.atol, kl_limit=args.kl_limit, allow_token_mismatch=args.allow_token_mismatch,
            progress=advance,
        )
    return report, batch


def _shape(batch: _Batch) -> str:
    return f"{batch.input_ids.shape[0]} rows x {batch.input_ids.shape[1]} tokens"


def _add_notes(args: argparse.Namespace, report: ParityReport, source: CheckpointSource, batch: _Batch) -> None:
    if source.format == "meta" and report.mode != "against":
        report.notes.append(
            "Meta checkpoint: transformers cannot read consolidated.*.pth, so the reference was loaded "
            "from llama_port's conversion of it and shares our Meta name mapping and permutations"
        )
    if source.format == "gguf" and report.mode == "stream":
        report.notes.append(
            "GGUF streamed: the reference's weights were read by the functions transformers' GGUF loading runs "
            "(gguf's dequantize, its llama tensor processor and name map), one layer at a time"
        )
    if args.dtype == "float32" and args.ratio is not None:
        report.notes.append("--ratio applies to bfloat16/float16 only; float32 is judged by --atol")
    if args.greedy_tokens is not None and not report.streamed:
        report.notes.append("--greedy-tokens applies when streaming; whole models generated --max-new-tokens")
    if batch.generation_ids is not None and report.greedy_match is not None:
        report.notes.append(f"greedy prompt: {(args.prompt or DEFAULT_PROMPTS)[0]!r}")


def _check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 1:
        raise ValueError(f"--seq-len {args.seq_len}; expected >= 1")
    if args.batch < 0:
        raise ValueError(f"--batch {args.batch}; expected >= 0")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}; expected >= 0")
    if args.greedy_tokens is not None and args.greedy_tokens < 0:
        raise ValueError(f"--greedy-tokens {args.greedy_tokens}; expected >= 0")
    for flag, value in (("atol", args.atol), ("ratio", args.ratio), ("kl-max", args.kl_limit)):
        if value is not None and not value > 0:
            raise ValueError(f"--{flag} {value}; expected a positive number")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if args.attn == "flash_attention_2" and args.device != "cuda":
        raise ValueError("--attn flash_attention_2 needs --device cuda")
    if args.quantize is not None:
        if args.against is not None or args.stream:
            raise ValueError(f"--quantize {args.quantize} compares whole models against transformers; "
                             "not with --against or --stream")  # fmt: skip
        if args.kl_limit is None:
            raise ValueError(f"--quantize {args.quantize}: give the KL you allow (--kl-max KL); an int8 model "
                             "is judged by its KL to the unquantized reference, not by --atol")  # fmt: skip
        if args.dtype != "float32":
            raise ValueError(f"--quantize {args.quantize}: with --dtype float32 only (the reference is the float32 model)")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ValueError("--prompt: empty prompt text")
    if args.plot == "-":
        raise ValueError("--plot needs a file path (a PNG), not '-'")
    if args.tp_plan is not None and (args.stream or args.against is not None):
        raise ValueError(
            "--tp-plan compares whole models (each rank: transformers' whole model against its shard of ours); "
            "it does not combine with --stream or --against"
        )
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


def _streamed(args: argparse.Namespace, config: Any, console: Any) -> bool:
    """Whether to stream: --stream / --no-stream, else only when the whole models would not fit
    (said on stderr). Checked before loading anything: a batch longer than the model's context, or
    needing more memory than is available in the chosen mode, is refused (ValueError naming the
    flag, the bound and the estimate)."""
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the checkpoint's max_position_embeddings={config.max_position_embeddings}"
        )
    if args.tp_plan is not None:
        return False  # whole models only (see _check_args)
    rows = args.batch + len(args.prompt or DEFAULT_PROMPTS)
    models = 3 if args.dtype in LOW_PRECISION_DTYPES and args.against is None else 2
    whole = _parity_bytes(config, rows, args.seq_len, models, streamed=False)
    stream = _parity_bytes(config, rows, args.seq_len, models, streamed=True)
    available = _available_memory()
    streamed = args.stream if args.stream is not None else available is not None and whole > available
    streamed = streamed and args.quantize is None  # a quantized model is compared whole (--quantize)
    needed = stream if streamed else whole
    if available is not None and needed > available:
        raise ValueError(
            f"--batch {args.batch} x --seq-len {args.seq_len} needs about {needed / 2**30:.1f} GiB for the weights, "
            f"logits and per-layer states of the compared models{' streamed' if streamed else ''}; "
            f"{available / 2**30:.1f} GiB is available. Lower --batch or --seq-len"
        )
    if streamed and args.stream is None:
        console.print(
            f"note: two whole models need about {whole / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available: "
            "comparing one decoder layer at a time (--no-stream forces the whole-model path)",
            soft_wrap=True,
        )
    return streamed


def _parity_bytes(config: Any, rows: int, seq_len: int, models: int, streamed: bool) -> int:
    """A floor on the comparison's memory, in float32, for ``models`` models: whole, each model's
    weights and per-layer hidden states (L + 3 probes of (B, T, C)); streamed, each model's
    embedding (or head), one decoder layer and a few hidden states; in both, each model's logits
    (B, T, V) and the float64 KL of one logits copy."""
    hidden, heads = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = hidden * (2 * heads + 2 * kv) + 3 * hidden * config.intermediate_size
    embedding = config.vocab_size * hidden
    tokens = rows * seq_len
    if streamed:
        weights, states = embedding + layer, 4
    else:
        weights, states = 2 * embedding + config.num_hidden_layers * layer, config.num_hidden_layers + 3
    activations = tokens * (config.vocab_size + states * hidden)
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
    """One rich status line on stderr that shows the current step, and a bar over layers while
    streaming; silent when disabled. ``timings``: seconds per step, always measured."""

    def __init__(self, console: Any, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.status = None
        self.current: str | None = None
        self.key: str | None = None
        self.started = 0.0
        self.timings: dict[str, float] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.status = self.console.status("starting")
            self.status.__enter__()
        return self

    def step(self, key: str | None, message: str) -> None:
        """Start step ``key`` (its name in ``timings``; None: a step the report times itself), shown as ``message``."""
        self._finish_current()
        self.key, self.current, self.started = key, message, time.perf_counter()
        if self.status is not None:
            self.status.update(message + " ...")

    @contextlib.contextmanager
    def bar(self, key: str | None, message: str, total: int) -> Iterator[Callable[[int, int], None] | None]:
        """Step ``key`` with a bar over ``total`` layers: yields the (done, total) callback (None when silent)."""
        self.step(key, message)
        if self.status is None:
            yield None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.status.stop()  # one live display at a time
        columns = (TextColumn(message), BarColumn(), MofNCompleteColumn(), TextColumn("layers"), TimeRemainingColumn())
        try:
            with Progress(*columns, console=self.console, transient=True) as bar:
                task = bar.add_task(message, total=total)
                yield lambda done, layers: bar.update(task, completed=done, total=layers)
        finally:
            self.status.start()

    def _finish_current(self) -> None:
        if self.current is None:
            return
        seconds = time.perf_counter() - self.started
        if self.key is not None:
            self.timings[self.key] = self.timings.get(self.key, 0.0) + seconds
        if self.enabled:
            self.console.print(f"[green]done[/] {self.current} ({seconds:.1f}s)")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish_current()
        if self.status is not None:
            self.status.__exit__(exc_type, exc, tb)
