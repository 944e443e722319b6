"""Peak memory and time of parity with both whole models against layer-streaming parity, same run.

    python scripts/bench_parity.py                    # builds a ~0.47B-parameter, 32-layer fp32 LLaMA in --workdir
    python scripts/bench_parity.py --checkpoint DIR --repeats 3 --threads 1

Each comparison runs in a fresh subprocess, the two modes interleaved, on the calls ``llama-port
parity --no-stream --max-new-tokens 0`` and ``llama-port parity --stream`` make (the built
checkpoint has no tokenizer, so the batch is the command's 2 random left-padded rows of 32 tokens;
greedy generation is off in both, as streaming defaults to). Peak RSS is the child's own VmHWM,
imports included; a thread in the child samples its RSS every 10 ms, and the streaming child
marks the end of each decoder layer, which gives the measured costs the projection uses:

- whole: bytes held per fp32 weight byte, r = (peak - after imports) / checkpoint bytes;
- streaming: the memory one layer step adds over what is held between layers, in decoder
  layers, k (median over layers); the final norm + head step's, in heads (both sides), h; and
  the rest of the peak, held = peak - imports - the larger step (taken as fixed).

Projection for a model (fp32 weights of one layer: layer bytes; embedding and head: head bytes
each): whole = imports + r x model bytes; streaming = imports + held + max(k x layer bytes,
h x 2 x head bytes), the embedding and head being held one at a time on each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ~0.47B parameters, 32 layers: 1.88 GB in float32, one safetensors file (saved by transformers).
BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Shapes of the projected models (their config.json): fp32 weights, untied heads.
PROJECTED = {
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
    "Llama-3.1-70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8),
}  # fmt: skip

BUILD = r"""
import sys, torch, transformers
config = transformers.LlamaConfig(**__CONFIG__)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
model = model.to_empty(device="cpu")
torch.manual_seed(0)
with torch.no_grad():
    for name, param in model.named_parameters():
        param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
model.config.dtype = "float32"
model.save_pretrained(sys.argv[1])
"""

CHILD = r"""
import json, os, sys, threading, time
mode, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

samples, running = [], True
def sample():
    while running:
        samples.append((time.perf_counter(), rss()))
        time.sleep(0.01)

import torch, transformers, safetensors  # the imports both modes pay, measured below
from transformers.models.llama import modeling_llama
from llama_port.checkpoints import open_checkpoint
from llama_port.cli.common import load_model
from llama_port.parity import (
    PortLayers, ReferenceLayers, compare, compare_streaming, left_pad, load_reference, random_batch,
)
transformers.logging.set_verbosity_error()
torch.set_num_threads(threads)
after_import = status_bytes("VmRSS")
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
source = open_checkpoint(path)
pad = source.config.pad_token_id or 0
ids, mask = left_pad(random_batch(source.config.vocab_size, 2, 32, pad), pad, 32)  # the command's --batch 2 --seq-len 32
marks = []
if mode == "whole":
    reference = load_reference(source, "float32", "cpu", "sdpa")
    report = compare(load_model(source, "float32", "cpu", "sdpa"), reference, ids, mask, max_new_tokens=0)
else:
    report = compare_streaming(
        PortLayers(source, "float32", "cpu", "sdpa"), ReferenceLayers(source, "float32", "cpu", "sdpa"), ids, mask,
        dtype="float32", progress=lambda done, total: marks.append((time.perf_counter(), rss())),
    )
seconds = time.perf_counter() - start
running = False
print(json.dumps({
    "seconds": seconds, "peak": status_bytes("VmHWM"), "after_import": after_import, "samples": samples,
    "marks": marks, "passed": report.passed, "max_abs_diff": report.max_abs_diff, "timings": report.timings,
}))
"""


def build_checkpoint(folder: Path) -> Path:
    """A random fp32 LLaMA saved by transformers, built in a subprocess (skipped when already there)."""
    if (folder / "model.safetensors").is_file():
        return folder
    code = BUILD.replace("__CONFIG__", repr(BENCH_CONFIG))
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, stderr=subprocess.DEVNULL)
    return folder


def run_child(mode: str, checkpoint: Path, threads: int) -> dict:
    """One comparison in a fresh interpreter; the figures it reports (see CHILD)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(checkpoint), str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} parity failed on {checkpoint} (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sizes(config: dict) -> tuple[int, int, int]:
    """(parameters of one decoder layer, of the embedding (= of the head), of the whole model), untied."""
    hidden, head_dim = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    layer = hidden * (2 * q + 2 * kv) + 3 * hidden * config["intermediate_size"] + 2 * hidden
    embedding = config["vocab_size"] * hidden
    return layer, embedding, config["num_hidden_layers"] * layer + 2 * embedding + hidden


def step_costs(run: dict) -> tuple[float, float, float]:
    """From one streaming child's samples: (median memory one layer step adds over the least RSS
    of that step, i.e. over what is held between layers; what the final norm + head step adds;
    seconds per layer step). Layer steps lie between the marks the child made after each layer."""
    samples, marks = run["samples"], run["marks"]

    def window(t0: float, t1: float) -> list[int]:
        return [r for t, r in samples if t0 < t <= t1]

    adds = []
    for (t0, held), (t1, after) in zip(marks, marks[1:]):
        inside = window(t0, t1) + [held, after]
        adds.append(max(inside) - min(inside))
    tail = window(marks[-1][0], float("inf")) + [marks[-1][1]]
    per_layer_s = (marks[-1][0] - marks[0][0]) / (len(marks) - 1)
    return statistics.median(adds), max(tail) - min(tail), per_layer_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="Hub-format fp32 folder (default: build one)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llama_port_bench_parity",
                        help="where the built checkpoint is kept between runs")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, interleaved (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    args = parser.parse_args()

    checkpoint = args.checkpoint or build_checkpoint(args.workdir / "bench-llama-0.5b-fp32")
    config = json.loads((checkpoint / "config.json").read_text())
    layer, embedding, params = sizes(config)
    model_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"checkpoint: {checkpoint} ({params / 1e9:.2f}B parameters, {config['num_hidden_layers']} layers, "
          f"{model_bytes / 1e9:.2f} GB)")  # fmt: skip
    runs: dict[str, list[dict]] = {"whole": [], "stream": []}
    run_child("stream", checkpoint, args.threads)  # warm-up: page cache, .pyc files
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(run_child(mode, checkpoint, args.threads))
    for mode, results in runs.items():
        if not all(r["passed"] for r in results):
            print(f"warning: {mode} parity did not pass (max |diff| {results[0]['max_abs_diff']:.3e})")

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    imports = median("whole", "after_import")
    print(f"{'mode':<8}{'peak RSS':>12}{'time s':>9}   phases (s, median run)")
    for mode in runs:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in runs[mode][0]["timings"].items())
        print(f"{mode:<8}{median(mode, 'peak') / 2**30:>10.2f} GiB{median(mode, 'seconds'):>9.1f}   {phases}")
    peak_ratio = median("stream", "peak") / median("whole", "peak")
    time_ratio = median("stream", "seconds") / median("whole", "seconds")
    print(f"stream / whole: peak RSS {peak_ratio:.2f}x (bar 0.40), time {time_ratio:.2f}x (bar 1.50); "
          f"imports {imports / 2**30:.2f} GiB")  # fmt: skip

    r = (median("whole", "peak") - imports) / model_bytes
    costs = [step_costs(run) for run in runs["stream"]]
    k = statistics.median(c[0] for c in costs) / (4 * layer)
    h = statistics.median(c[1] for c in costs) / (2 * 4 * embedding)
    seconds_per_layer = statistics.median(c[2] for c in costs)
    # The rest of the streaming peak, besides the step it falls in: taken as fixed.
    held = median("stream", "peak") - imports - max(k * 4 * layer, h * 2 * 4 * embedding)
    print(f"measured: whole holds {r:.2f} bytes per checkpoint byte; a streamed layer step adds {k:.2f} decoder "
          f"layers, the head step {h:.2f} heads (both sides), {held / 2**20:.0f} MiB more is held; "
          f"{seconds_per_layer:.3f} s per layer step")  # fmt: skip
    print(f"\n{'projection (fp32)':<18}{'weights':>10}{'whole peak':>13}{'streaming peak':>16}{'ratio':>8}")
    for name, shape in {"this checkpoint": config, **PROJECTED}.items():
        layer_p, embedding_p, params_p = sizes(shape)
        whole = imports + r * 4 * params_p
        stream = imports + held + max(k * 4 * layer_p, h * 2 * 4 * embedding_p)
        print(f"{name:<18}{4 * params_p / 2**30:>8.1f} GiB{whole / 2**30:>9.1f} GiB{stream / 2**30:>12.1f} GiB"
              f"{stream / whole:>8.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
