"""Per-rank peak memory and load time of a tensor-parallel load, at tp=1 and tp=2, under torchrun.

    python scripts/bench_distributed.py                  # builds (once) a ~0.47B-parameter fp32 LLaMA in --workdir
    python scripts/bench_distributed.py --checkpoint DIR --tp 1,2,4 --threads 1

The checkpoint is bench_parity.py's (transformers' random init, 32 layers, hidden 1024, GQA 16/8
heads, one 1.9 GB fp32 safetensors file, kept in /tmp between runs). Each configuration is a fresh
``torchrun --standalone --nproc-per-node N`` launch: gloo on CPU, nccl with one GPU per rank when
CUDA is there (tp sizes above the GPU count are skipped). Every rank reports its peak RSS (VmHWM
from /proc/self/status, imports included), its RSS after the imports, the time of
``LlamaForCausalLM.from_pretrained(ckpt, tp_plan="auto")``, the bytes of weights it holds, and the
time of one forward over a (1, 32) batch; on CUDA also torch.cuda.max_memory_allocated. "single"
is the plain single-process load (no tp_plan; it keeps the file's memory map as the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
from bench_parity import build_checkpoint  # noqa: E402 - the one builder of the benchmark checkpoint


def status_bytes(key: str) -> int:
    """A /proc/self/status field (VmHWM, VmRSS, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(checkpoint: Path, out: Path, tp: bool) -> None:
    """One rank (or the single process): load, one forward, write this rank's figures to ``out``."""
    import torch

    import llama_port
    from llama_port.distributed import is_distributed

    after_import = status_bytes("VmRSS")
    start = time.perf_counter()
    options = {"tp_plan": "auto"} if tp else {}
    model = llama_port.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **options)
    load_s = time.perf_counter() - start
    peak_after_load = status_bytes("VmHWM")
    held = sum((p.to_local() if is_distributed(p) else p).nbytes for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids)
    forward_s = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    figures = dict(rank=rank, load_s=load_s, forward_s=forward_s, after_import=after_import,
                   peak_after_load=peak_after_load, peak=status_bytes("VmHWM"), weights_held=held)
    if torch.cuda.is_available():
        figures["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    (out / f"rank{rank}.json").write_text(json.dumps(figures))


def launch(checkpoint: Path, tp: int | None, threads: int) -> list[dict]:
    """One configuration in fresh processes (tp None: the single-process plain load); each rank's figures."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        script = [str(Path(__file__).resolve()), "--child", str(checkpoint), out]
        if tp is None:
            command = [sys.executable, *script]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
                       *script, "--child-tp"]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="Hub-format safetensors folder (default: build one)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llama_port_bench_parity",
                        help="where the built checkpoint is kept between runs (shared with bench_parity.py)")
    parser.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes (default 1,2)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank (default 1)")
    parser.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-tp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child_tp)
        return 0

    import torch

    checkpoint = args.checkpoint or build_checkpoint(args.workdir / "bench-llama-0.5b-fp32")
    model_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    sizes = [int(n) for n in args.tp.split(",")]
    gpus = torch.cuda.device_count()
    backend = f"nccl, {gpus} GPU(s)" if gpus else "gloo, CPU"
    print(f"checkpoint: {checkpoint} ({model_bytes / 1e9:.2f} GB fp32 safetensors); {backend}, "
          f"{args.threads} thread(s) per rank")  # fmt: skip
    launch(checkpoint, None, args.threads)  # warm-up: page cache, .pyc files
    runs: dict[str, list[dict]] = {"single": launch(checkpoint, None, args.threads)}
    for tp in sizes:
        if gpus and tp > gpus:
            print(f"tp={tp}: skipped, {gpus} GPU(s) here (nccl takes one per rank)")
            continue
        runs[f"tp={tp}"] = launch(checkpoint, tp, args.threads)

    gib = 2**30
    print(f"\n{'run':<8}{'rank':>5}{'peak RSS':>12}{'after imports':>15}{'weights held':>15}{'load s':>8}{'forward s':>11}"
          + ("  cuda max alloc" if gpus else ""))  # fmt: skip
    for name, ranks in runs.items():
        for r in ranks:
            cuda = f"{r['cuda_max_allocated'] / gib:>12.2f} GiB" if "cuda_max_allocated" in r else ""
            print(f"{name:<8}{r['rank']:>5}{r['peak'] / gib:>8.2f} GiB{r['after_import'] / gib:>11.2f} GiB"
                  f"{r['weights_held'] / gib:>11.2f} GiB{r['load_s']:>8.2f}{r['forward_s']:>11.2f}{cuda}")  # fmt: skip

    base = runs.get("tp=1") or runs["single"]
    base_name = "tp=1" if "tp=1" in runs else "single"

    def worst(ranks: list[dict], key: str) -> float:
        return max(r[key] for r in ranks)

    print(f"\nratios against {base_name} (worst rank):")
    print(f"{'run':<8}{'peak RSS':>10}{'peak RSS - imports':>20}{'weights held':>14}{'load time':>11}")
    for name, ranks in runs.items():
        above = (worst(ranks, "peak") - worst(ranks, "after_import")) / (worst(base, "peak") - worst(base, "after_import"))
        print(f"{name:<8}{worst(ranks, 'peak') / worst(base, 'peak'):>9.2f}x{above:>19.2f}x"
              f"{worst(ranks, 'weights_held') / worst(base, 'weights_held'):>13.2f}x"
              f"{worst(ranks, 'load_s') / worst(base, 'load_s'):>10.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
