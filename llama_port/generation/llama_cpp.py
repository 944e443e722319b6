"""llama.cpp as a yardstick for ``llama-port bench``: find its binaries, convert an HF folder to
GGUF at a given precision, and run ``llama-bench``, parsing its JSON.

Nothing here is a dependency: llama.cpp is found on PATH (``llama-bench``, ``llama-quantize``) or
given by path, and its ``convert_hf_to_gguf.py`` is taken from its source tree (``--llama-cpp-dir``;
by default the tree above a ``build/bin`` holding the binary), run with that tree's own ``gguf-py``
so the converter and its library match. Every failure is a :class:`LlamaCppError` whose message
says what to fix, so the bench can skip llama.cpp's rows with a reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GGUF file types by the precision they stand beside: F32 and BF16 come straight from the
# converter, Q8_0 from llama-quantize on the F32 file (llama.cpp's own 8-bit path).
GGUF_TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0"}
CONVERTER = "convert_hf_to_gguf.py"


class LlamaCppError(RuntimeError):
    """llama.cpp could not be found, could not convert, or its bench failed; the message says why."""


@dataclass
class LlamaCppTools:
    """Where llama.cpp's pieces are: llama-bench, llama-quantize (beside it or on PATH), and the
    source tree holding convert_hf_to_gguf.py (None when not found)."""

    bench: Path
    quantize: Path | None
    source_dir: Path | None

    @classmethod
    def find(cls, bench: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None) -> LlamaCppTools | None:
        """``bench`` (a path) or ``llama-bench`` on PATH; None when neither exists. A given path
        that does not exist is a LlamaCppError (the user asked for it)."""
        if bench is not None:
            path = Path(bench).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise LlamaCppError(f"--llama-bench {bench}: not an executable file")
        else:
            found = shutil.which("llama-bench")
            if found is None:
                return None
            path = Path(found)
        path = path.resolve()
        beside = path.parent / "llama-quantize"
        quantize = beside if beside.is_file() else (Path(q) if (q := shutil.which("llama-quantize")) else None)
        if source_dir is not None:
            tree = Path(source_dir).expanduser().resolve()
            if not (tree / CONVERTER).is_file():
                raise LlamaCppError(f"--llama-cpp-dir {source_dir}: no {CONVERTER} there (the llama.cpp source tree)")
        else:  # a CMake build puts binaries in <tree>/build/bin
            candidates = [p for p in path.parents[:4] if (p / CONVERTER).is_file()]
            tree = candidates[0] if candidates else None
        return cls(path, quantize, tree)


def _run(command: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    """Run ``command``, returning its stdout; a failure is a LlamaCppError naming ``what`` and the
    last lines of stderr (a signal, e.g. SIGILL from a binary built for another CPU, by name)."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        if done.returncode < 0:
            reason = f"killed by {signal.Signals(-done.returncode).name}"
            if -done.returncode == signal.SIGILL:
                reason += " (the binary uses instructions this CPU or kernel does not allow, e.g. AMX; rebuild it here)"
        else:
            reason = f"exit status {done.returncode}"
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise LlamaCppError(f"{what} failed: {reason}\n{tail}".rstrip())
    return done.stdout


def convert_to_gguf(tools: LlamaCppTools, hf_dir: Path, out_dir: Path, precision: str) -> Path:
    """The GGUF file of the HF folder ``hf_dir`` at ``precision`` ("fp32", "bf16", "int8" ->
    F32, BF16, Q8_0), written into ``out_dir`` (reused when already there)."""
    if precision not in GGUF_TYPES:
        raise ValueError(f"precision={precision!r}; expected one of {sorted(GGUF_TYPES)}")
    gguf_type = GGUF_TYPES[precision]
    out = out_dir / f"model-{gguf_type}.gguf"
    if out.is_file():
        return out
    if gguf_type == "Q8_0":
        if tools.quantize is None:
            raise LlamaCppError("llama-quantize not found (beside llama-bench or on PATH): cannot make Q8_0")
        source = convert_to_gguf(tools, hf_dir, out_dir, "fp32")
        _run([str(tools.quantize), str(source), str(out), "Q8_0"], "llama-quantize")
        return out
    if tools.source_dir is None:
        raise LlamaCppError(f"{CONVERTER} not found: pass --llama-cpp-dir (the llama.cpp source tree)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools.source_dir / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(tools.source_dir / CONVERTER), str(hf_dir), "--outtype", gguf_type.lower(), "--outfile", str(out)]
    _run(command, CONVERTER, env=env)
    return out


@dataclass
class LlamaBenchResult:
    """One llama-bench run's averages: prompt processing (``pp``, tokens/s over ``prompt_tokens``)
    and generation (``tg``, tokens/s over ``gen_tokens``), with the per-repetition samples."""

    prompt_tokens: int
    prompt_tokens_per_s: float
    gen_tokens: int
    gen_tokens_per_s: float
    prompt_samples: list[float]
    gen_samples: list[float]
    model_type: str
    build: str


def parse_llama_bench_json(text: str) -> LlamaBenchResult:
    """llama-bench ``-o json`` output (a list of tests, one with ``n_prompt`` > 0 and ``n_gen`` 0,
    one the reverse) -> LlamaBenchResult. Missing tests or fields are a LlamaCppError."""
    try:
        tests: list[dict[str, Any]] = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlamaCppError(f"llama-bench printed no JSON ({err}): {text[:200]!r}") from err
    prompt = [t for t in tests if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0]
    gen = [t for t in tests if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
    if not prompt or not gen:
        raise LlamaCppError("llama-bench JSON lacks a prompt test (-p N) or a generation test (-n N)")
    p, g = prompt[0], gen[0]
    try:
        return LlamaBenchResult(
            prompt_tokens=int(p["n_prompt"]),
            prompt_tokens_per_s=float(p["avg_ts"]),
            gen_tokens=int(g["n_gen"]),
            gen_tokens_per_s=float(g["avg_ts"]),
            prompt_samples=[float(x) for x in p.get("samples_ts", [p["avg_ts"]])],
            gen_samples=[float(x) for x in g.get("samples_ts", [g["avg_ts"]])],
            model_type=str(p.get("model_type", "")),
            build=f"{p.get('build_commit', '')} ({p.get('build_number', '')})",
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LlamaCppError(f"llama-bench JSON: missing or bad field ({err})") from err


def run_llama_bench(
    tools: LlamaCppTools, gguf: Path, prompt_tokens: int, gen_tokens: int, threads: int, repetitions: int = 1
) -> LlamaBenchResult:
    """``llama-bench -m gguf -p P -n N -t T -r R -o json``, parsed."""
    command = [str(tools.bench), "-m", str(gguf), "-p", str(prompt_tokens), "-n", str(gen_tokens),
               "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    return parse_llama_bench_json(_run(command, "llama-bench"))
