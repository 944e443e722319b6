"""``llama-port bench``: decode tokens/s and prefill time of every configuration in one run --
transformers fp32 and bf16, llama_port fp32 and bf16 (default and compiled) and int8, and
llama.cpp on the same weights as GGUF F32, BF16 and Q8_0 when its llama-bench is found -- with the
memory-bandwidth limit measured on the spot (generation.benchmark, generation.llama_cpp)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import load_tokenizer
from ..generation.benchmark import (
    BENCH_PROMPT,
    BenchCase,
    generate_case,
    llama_cpp_case,
    measure_read_bandwidth,
    print_bench_report,
    run_benchmark,
    weights_read_per_token,
)
from ..generation.llama_cpp import LlamaCppError, LlamaCppTools, convert_to_gguf
from ..parity import load_reference
from .common import UsageError, add_checkpoint_argument, add_threads_argument, load_model, open_source, set_threads

NAME = "bench"
HELP = "decode tokens/s and prefill time: transformers, llama_port (fp32, bf16, compiled, int8), llama.cpp"

DTYPE_OF = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Config:
    """One configuration ``--configs`` can name: which library, precision, and (ours) compiled."""

    library: str
    precision: str
    compile_mode: str | None = None  # ours: generate(compile=...) with the static cache

    @property
    def compiled(self) -> bool:
        return self.compile_mode is not None

    @property
    def title(self) -> str:
        if self.library == "llama.cpp":
            return f"llama.cpp {self.precision}"
        suffix = {None: "", "default": " compiled"}.get(self.compile_mode, f" compiled {self.compile_mode}")
        return f"{self.library} {self.precision}{suffix}"


CONFIGS = {
    "hf-fp32": Config("transformers", "fp32"),
    "hf-bf16": Config("transformers", "bf16"),
    "ours-fp32": Config("llama_port", "fp32"),
    "ours-fp32-compiled": Config("llama_port", "fp32", "default"),
    "ours-bf16": Config("llama_port", "bf16"),
    "ours-bf16-compiled": Config("llama_port", "bf16", "default"),
    "ours-int8": Config("llama_port", "int8"),
    "ours-int8-compiled": Config("llama_port", "int8", "default"),
    "llamacpp-f32": Config("llama.cpp", "fp32"),
    "llamacpp-bf16": Config("llama.cpp", "bf16"),
    "llamacpp-q8_0": Config("llama.cpp", "int8"),
    # Opt-in: compile="max-autotune" compiles in every process (1-2 minutes each on 2 cores).
    "ours-fp32-max-autotune": Config("llama_port", "fp32", "max-autotune"),
    "ours-bf16-max-autotune": Config("llama_port", "bf16", "max-autotune"),
    "ours-int8-max-autotune": Config("llama_port", "int8", "max-autotune"),
}
DEFAULT_CONFIGS = [name for name, config in CONFIGS.items() if config.compile_mode != "max-autotune"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default cpu)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode run (default 128; llama-bench -n)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill runs (default 512; llama-bench -p)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration; the report holds medians (default 3)")
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), metavar="LIST",
        help=f"comma-separated configurations to run, from {', '.join(CONFIGS)} (default: all but the "
             f"max-autotune ones, which compile in every process)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled configurations (a first compile takes minutes)")
    add_threads_argument(parser)
    parser.add_argument("--json", default=None, metavar="PATH|-", help="also write the report as JSON ('-': stdout)")
    parser.add_argument("--llama-bench", default=None, metavar="PATH",
                        help="llama.cpp's llama-bench binary (default: llama-bench on PATH; without one the llama.cpp rows are skipped)")
    parser.add_argument("--llama-cpp-dir", default=None, metavar="DIR",
                        help="llama.cpp's source tree, for convert_hf_to_gguf.py (default: the tree above the binary's build/bin)")
    parser.add_argument("--gguf-dir", default=None, metavar="DIR",
                        help="where the converted GGUF files go and are reused (default: a temporary folder, removed after)")
    parser.add_argument("--llama-bench-repetitions", type=int, default=1, metavar="N",
                        help="llama-bench -r per interleaved run (default 1)")
    parser.add_argument("--bandwidth-mb", type=int, default=1024, metavar="MB",
                        help="buffer size of the memory-bandwidth measurement (default 1024 MiB)")


def parse_configs(text: str, no_compile: bool) -> list[str]:
    """--configs -> the configuration names, in CONFIGS' order; unknown ones are a UsageError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or not names:
        raise UsageError(f"--configs {text!r}: unknown {unknown}; expected a comma-separated list of {list(CONFIGS)}")
    return [name for name in CONFIGS if name in names and not (no_compile and CONFIGS[name].compiled)]


def run(args: argparse.Namespace) -> int:
    """Load what the chosen configurations need, benchmark them interleaved, print the table (and
    JSON with --json)."""
    if args.new_tokens < 2 or args.prefill_tokens < 1 or args.repeats < 1 or args.llama_bench_repetitions < 1:
        raise UsageError("--new-tokens must be >= 2, --prefill-tokens, --repeats and --llama-bench-repetitions >= 1")
    names = parse_configs(args.configs, args.no_compile)
    set_threads(args.threads)
    source = open_source(args.checkpoint)

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    log(f"loading {source.location}")
    tokenizer = load_tokenizer(source)
    models: dict[tuple[str, str], Any] = {}
    load_errors: dict[tuple[str, str], str] = {}
    for name in names:
        config = CONFIGS[name]
        key = (config.library, config.precision)
        if config.library == "llama.cpp" or key in models or key in load_errors:
            continue
        try:  # one source for every model: each load works on its own copy of the config
            models[key] = _load(source, config, args.device)
        except ValueError as err:  # e.g. int8 on a device its kernel does not run on
            load_errors[key] = f"{type(err).__name__}: {err}"
            log(f"skipping {config.title}: {load_errors[key]}")
    ours_fp32 = models.get(("llama_port", "fp32"))
    vocab = next(iter(models.values())).config.vocab_size if models else None
    if tokenizer is not None:
        prompt_ids = torch.tensor([tokenizer(BENCH_PROMPT)["input_ids"]], dtype=torch.long)
    else:
        prompt_ids = torch.arange(1, 9)[None] % (vocab or 2)
    prompt_ids = prompt_ids.to(args.device)
    generator = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, vocab or 2, (1, args.prefill_tokens), generator=generator).to(args.device)

    cases: list[BenchCase] = []
    skipped: dict[str, str] = {}
    for name in names:
        config = CONFIGS[name]
        key = (config.library, config.precision)
        if key in models:
            cases.append(generate_case(config.title, config.library, config.precision, models[key], prompt_ids, long_ids,
                                       args.new_tokens, compile_mode=config.compile_mode))
        elif key in load_errors:
            skipped[config.title] = load_errors[key]
    with ExitStack() as stack:
        llama_names = [name for name in names if CONFIGS[name].library == "llama.cpp"]
        if llama_names:
            cases += _llama_cpp_cases(args, llama_names, source, tokenizer, ours_fp32, stack, skipped, log)
        log("measuring the memory read bandwidth")
        bandwidth = measure_read_bandwidth(args.bandwidth_mb, device=args.device)
        info = dict(checkpoint=str(source.location), device=args.device, prompt_tokens=prompt_ids.shape[1],
                    new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens)
        with torch.inference_mode():
            report = run_benchmark(cases, args.repeats, bandwidth, skipped, info, log)
    print_bench_report(report)
    if args.json:
        text = json.dumps(asdict(report), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def _load(source: Any, config: Config, device: str) -> Any:
    """The model a (library, precision) runs: ours or transformers' in fp32 / bf16, ours in int8."""
    if config.library == "transformers":
        return load_reference(source, DTYPE_OF[config.precision], device)
    if config.precision == "int8":  # int8 projections, the rest in float32
        return load_model(source, "float32", device, quantize="int8")
    return load_model(source, DTYPE_OF[config.precision], device)


def _llama_cpp_cases(
    args: argparse.Namespace, names: list[str], source: Any, tokenizer: Any, ours_fp32: Any, stack: ExitStack,
    skipped: dict[str, str], log: Any,
) -> list[BenchCase]:
    """llama.cpp's configurations: our fp32 weights saved as an HF folder (with the tokenizer),
    converted to GGUF at each precision; a missing or failing llama.cpp skips rows with a reason."""
    try:
        tools = LlamaCppTools.find(args.llama_bench, args.llama_cpp_dir)
    except LlamaCppError as err:
        raise UsageError(str(err)) from err
    if tools is None:
        skipped.update({CONFIGS[name].title: "llama-bench not on PATH (pass --llama-bench PATH)" for name in names})
        return []
    if ours_fp32 is None:
        ours_fp32 = load_model(source, "float32", "cpu")
    folder = Path(args.gguf_dir) if args.gguf_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llama-port-bench-")))
    hf_dir = folder / "hf"
    if not (hf_dir / "config.json").is_file():
        log(f"writing our fp32 weights as an HF folder for llama.cpp's converter ({hf_dir})")
        ours_fp32.save_pretrained(hf_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(hf_dir)
    cases = []
    weights_per_token = weights_read_per_token(ours_fp32)
    for name in names:
        precision = CONFIGS[name].precision
        try:
            log(f"converting to GGUF for {name}")
            gguf = convert_to_gguf(tools, hf_dir, folder, precision)
        except LlamaCppError as err:
            skipped[CONFIGS[name].title] = str(err).splitlines()[0]
            log(f"skipping {name}: {err}")
            continue
        cases.append(llama_cpp_case(tools, gguf, precision, args.prefill_tokens, args.new_tokens, torch.get_num_threads(),
                                    weights_per_token, args.llama_bench_repetitions))
    return cases
