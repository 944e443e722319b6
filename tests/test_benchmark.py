"""``llama-port bench`` pieces on a tiny model, no compiling and no timing assertions: the
interleaved benchmark's rows and ratios, the report's JSON fields, the bandwidth measurement,
the weight bytes a token reads, llama-bench's JSON parsed from a recorded output, and the
configurations the command line accepts."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_pair

from llama_port.generation.benchmark import (
    BenchCase,
    RunResult,
    decode_bytes_per_token,
    generate_case,
    measure_read_bandwidth,
    print_bench_report,
    run_benchmark,
    weights_read_per_token,
)
from llama_port.generation.llama_cpp import (
    LlamaCppError,
    LlamaCppTools,
    parse_llama_bench_json,
)

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"

REPORT_FIELDS = {
    "checkpoint", "device", "threads", "prompt_tokens", "new_tokens", "prefill_tokens", "repeats",
    "bandwidth_gb_per_s", "load_average_start", "load_average_end", "rows", "skipped",
}
ROW_FIELDS = {
    "name", "library", "precision", "decode_tokens_per_s", "prefill_ms", "prefill_tokens_per_s", "same_tokens",
    "vs_transformers_fp32", "vs_llama_cpp", "limit_tokens_per_s", "fraction_of_limit", "first_call_s",
    "decode_runs", "prefill_runs",
}


@pytest.fixture(scope="module")
def tiny_report():
    """Transformers and ours (fp32), plus a fake llama.cpp row and one whose warm-up fails."""
    ours, hf = make_tiny_pair("sdpa", max_position_embeddings=128)
    prompt, long_ids = torch.tensor([[5, 6, 7]]), torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    cases = [
        generate_case("transformers fp32", "transformers", "fp32", hf, prompt, long_ids, 6),
        generate_case("llama_port fp32", "llama_port", "fp32", ours, prompt, long_ids, 6),
        BenchCase("llama.cpp F32 (llama-bench)", "llama.cpp", "fp32", lambda: RunResult(50.0, 2.0), lambda: None,
                  bytes_per_token=4.0e5, prefill_tokens=16),
        BenchCase("llama.cpp BF16 (llama-bench)", "llama.cpp", "bf16", lambda: RunResult(1.0, 1.0), _sigill,
                  skip_errors=(LlamaCppError,)),
    ]
    with torch.inference_mode():
        report = run_benchmark(cases, repeats=2, bandwidth_gb_per_s=10.0, skipped={"llama_port int8": "TypeError: x"},
                               info=dict(checkpoint="tiny", prompt_tokens=3, new_tokens=6, prefill_tokens=16))
    return report, ours


def _sigill() -> None:
    raise LlamaCppError("llama-bench failed: killed by SIGILL")


def test_benchmark_rows_ratios_and_tokens(tiny_report):
    report, ours = tiny_report
    assert [r.name for r in report.rows] == ["transformers fp32", "llama_port fp32", "llama.cpp F32 (llama-bench)"]
    hf, mine, cpp = report.rows
    assert all(r.decode_tokens_per_s > 0 and r.prefill_ms > 0 and len(r.decode_runs) == 2 for r in report.rows)
    assert hf.vs_transformers_fp32 == 1.0 and hf.same_tokens is None
    assert mine.same_tokens is True  # greedy tokens equal transformers' at the same precision
    assert mine.vs_llama_cpp == pytest.approx(mine.decode_tokens_per_s / 50.0)
    assert mine.limit_tokens_per_s == pytest.approx(10.0e9 / decode_bytes_per_token(ours))
    assert cpp.prefill_tokens_per_s == pytest.approx(16 / 2.0 * 1000) and cpp.vs_llama_cpp is None
    assert report.skipped == {"llama_port int8": "TypeError: x", "llama.cpp BF16 (llama-bench)": "llama-bench failed: killed by SIGILL"}
    assert len(report.load_average_start) == 3 and len(report.load_average_end) == 3


def test_report_json_fields_and_table(tiny_report):
    report, _ = tiny_report
    data = json.loads(json.dumps(asdict(report)))
    assert set(data) == REPORT_FIELDS
    assert all(set(row) == ROW_FIELDS for row in data["rows"])
    out = io.StringIO()
    print_bench_report(report, file=out)
    text = out.getvalue()
    for words in ("x HF fp32", "x llama.cpp", "limit tok/s", "memory read bandwidth", "skipped llama_port int8",
                  "load average"):
        assert words in text


def test_weight_bytes_per_token_counts_one_embedding_row_unless_tied():
    ours, _ = make_tiny_pair("sdpa")
    config = ours.config
    embedding = config.vocab_size * config.hidden_size
    total = sum(p.numel() for p in ours.parameters())
    assert weights_read_per_token(ours) == total - embedding  # untied: the embedding is read a row at a time
    buffers = sum(b.numel() * b.element_size() for b in ours.buffers())
    assert decode_bytes_per_token(ours) == (total - embedding) * 4 + buffers
    tied, _ = make_tiny_pair("sdpa", tie_word_embeddings=True)
    assert weights_read_per_token(tied) == sum(p.numel() for p in tied.parameters())  # the head reads it whole


def test_read_bandwidth_is_positive():
    gb_per_s = measure_read_bandwidth(megabytes=16, repeats=2)
    assert gb_per_s > 0 and math.isfinite(gb_per_s)


def test_llama_bench_json_parsed_from_a_recorded_output():
    result = parse_llama_bench_json((DATA / "llama_bench_sample.json").read_text())
    assert result.prompt_tokens == 512 and result.gen_tokens == 128
    assert result.prompt_tokens_per_s > 0 and result.gen_tokens_per_s > 0
    assert len(result.gen_samples) >= 1 and result.model_type
    for bad, words in (("not json", "no JSON"), ("[]", "lacks a prompt test"),
                       ('[{"n_prompt": 8, "n_gen": 0}, {"n_prompt": 0, "n_gen": 4}]', "missing or bad field")):
        with pytest.raises(LlamaCppError, match=words):
            parse_llama_bench_json(bad)


def test_llama_cpp_tools_found_or_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert LlamaCppTools.find() is None  # none on PATH: the rows are skipped
    with pytest.raises(LlamaCppError, match="not an executable file"):
        LlamaCppTools.find(tmp_path / "missing")
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("")
    for tool in ("llama-bench", "llama-quantize"):
        (tree / "build" / "bin" / tool).write_text("#!/bin/sh\n")
        (tree / "build" / "bin" / tool).chmod(0o755)
    tools = LlamaCppTools.find(tree / "build" / "bin" / "llama-bench")
    assert tools.source_dir == tree.resolve() and tools.quantize == (tree / "build" / "bin" / "llama-quantize").resolve()


def test_bench_configs_option():
    from llama_port.cli.bench import CONFIGS, DEFAULT_CONFIGS, parse_configs
    from llama_port.cli.common import UsageError

    assert parse_configs(",".join(CONFIGS), no_compile=False) == list(CONFIGS)
    assert not any(CONFIGS[name].compiled for name in parse_configs(",".join(CONFIGS), no_compile=True))
    assert "ours-fp32-max-autotune" not in DEFAULT_CONFIGS and "ours-fp32-compiled" in DEFAULT_CONFIGS
    assert CONFIGS["ours-bf16-max-autotune"].title == "llama_port bf16 compiled max-autotune"
    assert parse_configs("ours-int8, hf-fp32", no_compile=False) == ["hf-fp32", "ours-int8"]
    with pytest.raises(UsageError, match="unknown"):
        parse_configs("hf-fp32,fast", no_compile=False)
