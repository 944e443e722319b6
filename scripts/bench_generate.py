"""Decode tokens/s and prefill time of every configuration, in one run: transformers fp32 / bf16,
llama_port fp32 / bf16 (default and compiled) and int8, llama.cpp F32 / BF16 / Q8_0.

    python scripts/bench_generate.py [CHECKPOINT] [--threads N] [--new-tokens 128]
        [--prefill-tokens 512] [--repeats 3] [--configs LIST] [--no-compile]
        [--llama-bench PATH] [--llama-cpp-dir DIR]
        [--gguf-dir DIR] [--json PATH|-]

The same code as ``llama-port bench`` (llama_port/cli/bench.py, llama_port/generation/benchmark.py);
see their docstrings for how the timings are taken. Without CHECKPOINT: the embedded
SmolLM2-135M-Instruct GGUF. llama.cpp's rows run when llama-bench is on PATH or given.
"""

from __future__ import annotations

import sys

from llama_port.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
