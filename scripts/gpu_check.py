"""GPU check for the attention backends: parity with transformers, prefill and decode speed, peak memory.

Runs a LLaMA in bf16 on CUDA with each backend:
  * flash_attention_2 (flash-attn's kernels), when ``flash_attn`` imports;
  * sdpa with PyTorch's own FlashAttention-2 kernel forced (torch.nn.attention.sdpa_kernel);
  * eager (up to 8k tokens: its T x T scores do not fit beyond).
For each: max |logit diff| against transformers with the same backend on the same weights, prefill
tokens/s at 2k, 8k and 32k tokens, decode tokens/s (greedy, static cache), and peak CUDA memory.

Usage: python scripts/gpu_check.py [--preset llama-3.2-1b] [--lengths 2048 8192 32768] [--json out.json]
Weights are random (seeded): speed and parity do not depend on trained values. On a CPU-only
machine it exits 0 after saying there is nothing to measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch


def _sdpa_flash_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def _timed(fn, repeats: int = 3) -> float:
    """Best wall time of ``fn`` in seconds (after one warm-up), CUDA-synchronised."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (faster runs)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to measure")
        return 0

    import transformers

    import llama_port
    from llama_port.attention import flash_attn_is_usable

    overrides = {"max_position_embeddings": max(131072, max(args.lengths) + args.new_tokens)}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    config = llama_port.LlamaConfig.from_preset(args.preset, **overrides)
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**config.to_dict())
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    state = hf.state_dict()

    backends = ["sdpa", "eager"] + (["flash_attention_2"] if flash_attn_is_usable() else [])
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"model: {args.preset} ({config.num_hidden_layers} layers), bf16; flash_attn usable: {flash_attn_is_usable()}")
    results = []
    probe = torch.randint(0, config.vocab_size, (2, 512), device=device)
    for name in backends:
        forced = _sdpa_flash_only if name == "sdpa" else nullcontext
        with torch.device(device):
            ours = llama_port.LlamaForCausalLM(config, attn_implementation=name).to(dtype).eval()
        ours.load_state_dict(state, strict=False)
        hf.set_attn_implementation(name)
        row = {"backend": name + (" (PyTorch FA2 kernel forced)" if name == "sdpa" else "")}
        with torch.inference_mode(), forced():
            diff = (ours(probe).logits.float() - hf(probe).logits.float()).abs().max().item()
            row["max_abs_diff_vs_transformers"] = diff
            for n in args.lengths:
                if name == "eager" and n > 8192:
                    continue
                ids = torch.randint(0, config.vocab_size, (1, n), device=device)
                torch.cuda.reset_peak_memory_stats()
                seconds = _timed(lambda: ours(ids, logits_to_keep=1, use_cache=False))
                row[f"prefill_{n}_tok_s"] = n / seconds
                row[f"prefill_{n}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            prompt = torch.randint(0, config.vocab_size, (1, 32), device=device)
            gen = lambda: ours.generate(prompt, max_new_tokens=args.new_tokens, cache_implementation="static")  # noqa: E731
            row["decode_tok_s"] = args.new_tokens / _timed(gen, repeats=2)
        results.append(row)
        print(json.dumps(row))
        ours = gen = None  # free this backend's weights before the next one loads
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "preset": args.preset, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
