"""Decode tokens/s and prefill time, llama_port against transformers' generate, in one run.

    python scripts/bench_generate.py [CHECKPOINT] [--threads N] [--new-tokens 128]
        [--prefill-tokens 512] [--repeats 3] [--no-compile] [--json PATH|-]

The same code as ``llama-port bench`` (llama_port/generation/benchmark.py); see its docstring for how
the timings are taken. Without CHECKPOINT: the embedded SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import sys

from llama_port.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
