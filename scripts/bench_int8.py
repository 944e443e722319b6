"""Weight-only int8 against float32 on SmolLM2-135M (issue 14): decode speed and load memory.

    python scripts/bench_int8.py [--threads 2] [--tokens 128] [--repeats 3] [--compile] [--memory]

Decode: greedy, ``--tokens`` new tokens after a short prompt, ``generate(...,
cache_implementation="static")`` (``--compile``: also compile=True), the configurations
interleaved in one process, median tokens/s and the ratio to float32. ``--memory``: peak RSS
(VmHWM) of ``from_pretrained`` in float32 and with quantize="int8", each in a fresh process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

# The child's own VmHWM: ru_maxrss would report the forking parent's peak (it survives execve),
# and this parent holds three loaded models by then (see scripts/bench_load.py).
LOAD = """
import re, sys, torch, llama_port
from pathlib import Path
from llama_port.checkpoints import default_checkpoint
model = llama_port.LlamaForCausalLM.from_pretrained(default_checkpoint(), dtype=torch.float32, quantize={quantize!r})
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024)
"""


def peak_rss_mib(quantize: str | None) -> float:
    """VmHWM in MiB of a fresh process that imports llama_port and loads SmolLM2."""
    out = subprocess.run([sys.executable, "-c", LOAD.format(quantize=quantize)], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def decode_speed(models: dict, tokens: int, repeats: int, compile: bool) -> tuple[dict[str, float], dict[str, list[int]]]:
    """({name: median tokens/s}, {name: the greedy tokens}), the models run in turn ``repeats``
    times after one warm-up each."""
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345]])  # (1, T)
    options = {"do_sample": False, "cache_implementation": "static", "compile": compile, "eos_token_id": []}
    for model in models.values():
        model.generate(prompt, max_new_tokens=8, **options)  # warm-up (and compilation)
    speeds: dict[str, list[float]] = {name: [] for name in models}
    generated = {}
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            generated[name] = model.generate(prompt, max_new_tokens=tokens, **options)[0].tolist()
            speeds[name].append(tokens / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in speeds.items()}, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per generate call (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (default 3)")
    parser.add_argument("--compile", action="store_true", help="also measure compile=True")
    parser.add_argument("--memory", action="store_true", help="also measure the loads' peak RSS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llama_port
    from llama_port.checkpoints import default_checkpoint

    path = default_checkpoint()
    fp32 = llama_port.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    models = {
        "float32": fp32,
        "int8": llama_port.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, quantize="int8"),
        "int8, lm_head float32": llama_port.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).quantize(
            "int8", skip=("lm_head",)
        ),
    }
    eager_tokens = None
    for compile in (False, True) if args.compile else (False,):
        speeds, generated = decode_speed(models, args.tokens, args.repeats, compile)
        for name, speed in speeds.items():
            same = "" if eager_tokens is None else f", tokens identical to eager: {generated[name] == eager_tokens[name]}"
            print(f"decode{' compiled' if compile else ''} {name}: {speed:.1f} tok/s "
                  f"({speed / speeds['float32']:.2f}x float32){same}", flush=True)  # fmt: skip
        eager_tokens = eager_tokens or generated
    if args.memory:
        for quantize in (None, "int8"):
            print(f"peak RSS from_pretrained(quantize={quantize!r}): {peak_rss_mib(quantize):.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
