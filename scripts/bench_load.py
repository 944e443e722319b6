"""Load time and peak memory of llama_port's from_pretrained against transformers', same checkpoint.

    python scripts/bench_load.py                      # builds a ~440 MB bf16 sharded LLaMA in --workdir
    python scripts/bench_load.py --checkpoint DIR --dtype auto float32 --repeats 3

Every load runs in a fresh subprocess. Peak RSS is the child's own VmHWM (not ru_maxrss, which
execve keeps from the forking parent: a parent that built the checkpoint with transformers would
lend every child its peak); the child also reports its RSS right after its imports, so the table shows what the load itself cost, and its VmPeak (peak
address space, which ``ulimit -v`` and strict overcommit limit) after the load and after a forward. Time is the
from_pretrained call alone, median over --repeats runs (after one unmeasured warm-up run per
loader, so both read the files from the page cache).
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

# ~220M parameters: 440 MB in bf16, in 3 shards of at most 200 MB.
BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

CHILD = r"""
import json, sys, time
loader, path, dtype = sys.argv[1], sys.argv[2], sys.argv[3]

def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

import torch
if loader == "llama_port":
    from llama_port import LlamaForCausalLM
    load = lambda: LlamaForCausalLM.from_pretrained(path, dtype=dtype, progress=False)
else:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load = lambda: transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)
after_import = status_mb("VmRSS")
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
peak_after_load = status_mb("VmHWM")
vm_peak_after_load = status_mb("VmPeak")  # address space: what ulimit -v and strict overcommit limit
# Memory-mapped weights become resident when first used: one short forward shows the real cost.
ids = torch.arange(16).reshape(1, 16) + 10
start = time.perf_counter()
with torch.no_grad():
    logits = model(ids).logits
forward_seconds = time.perf_counter() - start
params = sum(p.numel() for p in model.parameters())
print(json.dumps({
    "seconds": seconds, "forward_seconds": forward_seconds, "after_import_mb": after_import,
    "peak_after_load_mb": peak_after_load, "vm_peak_after_load_mb": vm_peak_after_load,
    "vm_peak_mb": status_mb("VmPeak"), "peak_mb": status_mb("VmHWM"), "dtype": str(model.dtype), "params": params,
    "logits_sum": float(logits.float().sum()),
}))
"""


def build_checkpoint(folder: Path) -> Path:
    """A random LLaMA saved by transformers in bf16, sharded (skipped when already there)."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**BENCH_CONFIG)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.config.dtype = "bfloat16"
    model.save_pretrained(folder, max_shard_size="200MB")
    return folder


def run_child(loader: str, checkpoint: Path, dtype: str) -> dict:
    """One load in a fresh interpreter; the figures it reports (see CHILD)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, loader, str(checkpoint), dtype],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} failed to load {checkpoint} (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="Hub-format folder (default: build one)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llama_port_bench_load")
    parser.add_argument("--dtype", nargs="+", default=["auto", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    checkpoint = args.checkpoint or build_checkpoint(args.workdir / "bench-llama-bf16")
    shards = len(list(checkpoint.glob("*.safetensors")))
    print(f"checkpoint: {checkpoint} ({folder_size_mb(checkpoint):.0f} MB in {shards} safetensors files)")
    loaders = ("llama_port", "transformers")
    rows = []
    for dtype in args.dtype:
        results: dict[str, list[dict]] = {loader: [] for loader in loaders}
        for loader in loaders:
            run_child(loader, checkpoint, dtype)  # warm-up: page cache, .pyc files
        for _ in range(args.repeats):
            for loader in loaders:  # interleaved, so drift in the machine hits both alike
                results[loader].append(run_child(loader, checkpoint, dtype))
        summary = {}
        for loader in loaders:
            runs = results[loader]
            summary[loader] = {
                key: statistics.median(r[key] for r in runs)
                for key in ("seconds", "forward_seconds", "after_import_mb", "peak_after_load_mb", "peak_mb",
                            "vm_peak_after_load_mb", "vm_peak_mb")
            }
            summary[loader].update(dtype=runs[0]["dtype"].removeprefix("torch."), logits_sum=runs[0]["logits_sum"])
        rows.append((dtype, summary))
        ours, theirs = summary["llama_port"]["logits_sum"], summary["transformers"]["logits_sum"]
        if abs(ours - theirs) > 1e-3 * max(1.0, abs(theirs)):
            print(f"warning: dtype={dtype}: the two models' logits differ (sums {ours} vs {theirs})")

    columns = [
        ("load s", "seconds", "{:.3f}"),
        ("peak MB, load", "peak_after_load_mb", "{:.0f}"),
        ("1st fwd s", "forward_seconds", "{:.3f}"),
        ("peak MB, +fwd", "peak_mb", "{:.0f}"),
        ("after import MB", "after_import_mb", "{:.0f}"),
        ("VmPeak MB, load", "vm_peak_after_load_mb", "{:.0f}"),
        ("VmPeak MB, +fwd", "vm_peak_mb", "{:.0f}"),
    ]
    header = f"{'dtype':<9} {'loader':<14} {'model':<9}" + "".join(f"{title:>16}" for title, _, _ in columns)
    print(header)
    print("-" * len(header))
    for dtype, summary in rows:
        for loader in loaders:
            s = summary[loader]
            cells = "".join(f"{fmt.format(s[key]):>16}" for _, key, fmt in columns)
            print(f"{dtype:<9} {loader:<14} {s['dtype']:<9}{cells}")
        ours, theirs = summary["llama_port"], summary["transformers"]
        ratios = "".join(f"{ours[key] / theirs[key]:>16.2f}" for _, key, _ in columns)
        print(f"{dtype:<9} {'ours / tf':<14} {'':<9}{ratios}")
    print("peak MB: the process's peak RSS (imports included) after from_pretrained, and after one 16-token forward")
    print("VmPeak MB: the process's peak virtual address space (what `ulimit -v` caps), at the same two points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
