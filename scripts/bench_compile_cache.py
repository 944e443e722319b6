"""Compile time of the decode step in a first and a second process sharing one compile cache.

    python scripts/bench_compile_cache.py [CHECKPOINT] [--threads 2] [--new-tokens 16]
        [--dtype float32] [--cache-dir DIR] [--json PATH]

Each process is fresh (python -c ...): it loads the checkpoint, times its first
``generate(cache_implementation="static", compile=True)`` call (compiling or loading from the
cache, then ``--new-tokens`` tokens), then a second identical call (the steady state, whose tokens/s
is printed), and checks the tokens against eager greedy decoding. "compile" is the first call's
time minus the second's. The cache directory starts empty (a temporary one unless --cache-dir).
Without CHECKPOINT: the embedded SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from llama_port.checkpoints.resolve import default_checkpoint
import llama_port
from llama_port.generation.streamers import TimingStreamer
from torch._dynamo.utils import counters
checkpoint, dtype, threads, new_tokens = sys.argv[1] or str(default_checkpoint()), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = llama_port.LlamaForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype))
ids = torch.tensor([[1, 504, 2134, 282, 260, 11283, 3433, 6264]]) % model.config.vocab_size
kwargs = dict(max_new_tokens=new_tokens, eos_token_id=[], cache_implementation="static")
with torch.inference_mode():
    start = time.perf_counter()
    compiled = model.generate(ids, compile=True, **kwargs)
    first = time.perf_counter() - start
    streamer = TimingStreamer()
    start = time.perf_counter()
    model.generate(ids, compile=True, streamer=streamer, **kwargs)
    second = time.perf_counter() - start
    eager = model.generate(ids, **kwargs)
print(json.dumps(dict(first_call_s=first, steady_call_s=second, compile_s=first - second,
                      decode_tokens_per_s=streamer.decode_tokens_per_s(), same_tokens=bool(torch.equal(compiled, eager)),
                      fxgraph_cache_hit=counters["inductor"]["fxgraph_cache_hit"],
                      fxgraph_cache_miss=counters["inductor"]["fxgraph_cache_miss"],
                      fxgraph_cache_bypass=counters["inductor"]["fxgraph_cache_bypass"])))
"""


def run_process(checkpoint: str, dtype: str, threads: int, new_tokens: int, cache_dir: Path) -> dict:
    """One fresh process's measurements (the JSON line it prints); its stderr is passed through."""
    env = {**os.environ, "LLAMA_PORT_COMPILE_CACHE": str(cache_dir), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, checkpoint, dtype, str(threads), str(new_tokens)],
        env=env, stdout=subprocess.PIPE, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="", help="checkpoint path (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--dtype", default="float32", help="torch dtype name the model runs in (default float32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each process (default 2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per generate call (default 16)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="compile cache to use (default: a new temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write both processes' numbers as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llama-port-compile-cache-") as temporary:
        cache_dir = args.cache_dir or Path(temporary)
        results = {}
        for name in ("first process", "second process"):
            results[name] = run_process(args.checkpoint, args.dtype, args.threads, args.new_tokens, cache_dir)
            r = results[name]
            print(f"{name}: first call {r['first_call_s']:.1f} s (compile {r['compile_s']:.1f} s), steady "
                  f"{r['decode_tokens_per_s']:.1f} tok/s, FX cache hit/miss/bypass {r['fxgraph_cache_hit']}/"
                  f"{r['fxgraph_cache_miss']}/{r['fxgraph_cache_bypass']}, tokens equal to eager: {r['same_tokens']}")
        sizes = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
        print(f"cache directory {cache_dir}: {sizes / 2**20:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
