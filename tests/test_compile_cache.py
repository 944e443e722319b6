"""The compiled decode step's persistent cache (generation/compile_cache.py): fresh processes of a
tiny model sharing one cache directory. The second process loads instead of compiling and gives
eager's greedy tokens; a model of the same shapes with other weights shares the entry (its weights
are graph inputs) and gets its own correct tokens; a corrupt artifact file is ignored with a warning; the stderr message comes
once per process. The key and the artifact file format are checked without compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

import llama_port
from llama_port.generation import compile_cache
from llama_port.generation.compile import CPU_COMPILE_MODES

REPO = Path(__file__).resolve().parent.parent
CONFIG = {**TINY, "max_position_embeddings": 256}

# A fresh process: a tiny model from a seed, eager greedy tokens, then two compiled generate calls
# (the second must say nothing on stderr), and torch's FX graph cache counters.
CHILD = r"""
import json, sys, torch, llama_port
from torch._dynamo.utils import counters
torch.set_num_threads(1)
torch.manual_seed(int(sys.argv[1]))
model = llama_port.LlamaForCausalLM(llama_port.LlamaConfig(**json.loads(sys.argv[2]))).eval()
ids = torch.tensor([[5, 6, 7, 8, 9]])
kwargs = dict(max_new_tokens=10, eos_token_id=[], cache_implementation="static")
with torch.inference_mode():
    eager = model.generate(ids, **kwargs)
    compiled = model.generate(ids, compile=True, **kwargs)
    again = model.generate(ids, compile=True, **kwargs)
print(json.dumps(dict(eager=eager[0].tolist(), compiled=compiled[0].tolist(), again=again[0].tolist(),
                      hit=counters["inductor"]["fxgraph_cache_hit"], miss=counters["inductor"]["fxgraph_cache_miss"])))
"""


def run_child(seed: int, cache_dir: Path) -> tuple[dict, str]:
    """(the child's JSON line, its stderr)."""
    env = {**os.environ, "LLAMA_PORT_COMPILE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(seed), json.dumps(CONFIG)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def artifacts(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(f"*{compile_cache.ARTIFACT_SUFFIX}"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The first process on an empty cache: (cache dir, its result, its stderr)."""
    cache_dir = tmp_path_factory.mktemp("compile-cache")
    result, stderr = run_child(0, cache_dir)
    return cache_dir, result, stderr


def test_first_process_compiles_says_so_once_and_writes_the_artifact(first_run):
    cache_dir, result, stderr = first_run
    assert result["compiled"] == result["eager"] == result["again"]
    assert stderr.count("compiling the decode step (first call; cached in") == 1, stderr
    assert str(cache_dir) in stderr
    assert result["miss"] >= 1
    assert len(artifacts(cache_dir)) == 1
    assert compile_cache.read_artifact(artifacts(cache_dir)[0])
    fields = json.loads(artifacts(cache_dir)[0].with_suffix(".json").read_text())  # what the entry is for
    assert fields["batch_size"] == 1 and fields["max_cache_len"] == 256 and fields["config"]["hidden_size"] == 64


def test_second_process_loads_from_the_cache(first_run):
    cache_dir, first, _ = first_run
    result, stderr = run_child(0, cache_dir)
    assert result["compiled"] == result["eager"] == first["eager"]
    assert stderr.count("loading the compiled decode step from the cache") == 1, stderr
    assert "compiling the decode step" not in stderr and "compiled anew" not in stderr
    assert result["hit"] >= 1


def test_same_shapes_other_weights_share_the_entry_and_get_their_own_tokens(first_run):
    """The default mode does not freeze: the weights are inputs of the cached graph, so a model of
    the same shapes with other weights loads the first one's entry and must still decode with its
    own weights (a graph holding the first model's weights would give the first model's tokens)."""
    cache_dir, first, _ = first_run
    result, stderr = run_child(1, cache_dir)
    assert result["eager"] != first["eager"]  # the weights really differ
    assert result["compiled"] == result["eager"] == result["again"]
    assert stderr.count("loading the compiled decode step from the cache") == 1, stderr
    assert result["hit"] >= 1 and len(artifacts(cache_dir)) == 1


def test_corrupt_artifact_is_ignored_with_a_warning_and_rewritten(first_run):
    cache_dir, first, _ = first_run
    path = cache_dir / f"{key_of(tiny_model(seed=0))}{compile_cache.ARTIFACT_SUFFIX}"  # the child's key, computed here
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated mid-write by something that is not us
    result, stderr = run_child(0, cache_dir)
    assert "truncated or corrupt" in stderr, stderr
    assert result["compiled"] == result["eager"] == first["eager"]
    assert compile_cache.read_artifact(path) is not None  # written again, whole


# ----------------------------------------------------------------------- no compiling below
def tiny_model(seed: int = 0, dtype=torch.float32) -> llama_port.LlamaForCausalLM:
    torch.manual_seed(seed)
    return llama_port.LlamaForCausalLM(llama_port.LlamaConfig(**CONFIG)).to(dtype).eval()


def key_of(model, batch: int = 1, cache_len: int = 256, options=CPU_COMPILE_MODES["default"]) -> str:
    return compile_cache.step_key(compile_cache.step_key_fields(model, batch, cache_len, "cpu", options))


def test_key_covers_shapes_dtype_options_and_frozen_weights():
    base = key_of(tiny_model())
    assert key_of(tiny_model()) == base  # the same weights in another object: the same entry
    assert key_of(tiny_model(seed=1)) == base  # not frozen: the weights are graph inputs
    frozen = CPU_COMPILE_MODES["max-autotune"]
    assert key_of(tiny_model(seed=1), options=frozen) != key_of(tiny_model(), options=frozen)  # constants
    others = [
        key_of(tiny_model(dtype=torch.bfloat16)),
        key_of(tiny_model(), batch=2),
        key_of(tiny_model(), cache_len=512),
        key_of(tiny_model(), options=CPU_COMPILE_MODES["max-autotune"]),
    ]
    assert base not in others and len(set(others)) == len(others)
    relabelled = tiny_model()
    relabelled.config.dtype = "bfloat16"  # metadata a later load of the same source may set
    assert key_of(relabelled) == base
    fields = compile_cache.step_key_fields(tiny_model(), 1, 256, "cpu", CPU_COMPILE_MODES["default"])
    assert fields["torch"] == torch.__version__ and fields["llama_port"] == llama_port.__version__
    assert fields["device"] == f"cpu:{torch.backends.cpu.get_cpu_capability()}"


def test_cache_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_PORT_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache.cache_directory() == tmp_path / "mine"
    for off in ("off", "0", "false", ""):
        monkeypatch.setenv("LLAMA_PORT_COMPILE_CACHE", off)
        assert compile_cache.cache_directory() is None
    monkeypatch.delenv("LLAMA_PORT_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_directory() == tmp_path / "xdg" / "llama_port" / "compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.cache_directory() == Path.home() / ".cache" / "llama_port" / "compile"


def test_artifact_file_round_trip_and_refusals(tmp_path):
    path = tmp_path / "k.artifacts"
    assert compile_cache.read_artifact(path) is None  # none yet: no warning
    compile_cache.write_artifact(path, b"payload bytes")
    assert compile_cache.read_artifact(path) == b"payload bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["k.artifacts"]  # no temporary file left
    data = path.read_bytes()
    for bad, words in ((data[:-3], "truncated or corrupt"), (data[:-1] + b"X", "truncated or corrupt"),
                       (b"something else", "not a llama_port artifact")):
        path.write_bytes(bad)
        with pytest.warns(UserWarning, match=words):
            assert compile_cache.read_artifact(path) is None


def test_compile_modes_and_bad_values():
    from llama_port.generation.compile import compile_mode

    assert compile_mode(True) == "default" and compile_mode(False) is None and compile_mode(None) is None
    assert compile_mode("max-autotune") == "max-autotune"
    with pytest.raises(ValueError, match="compile='fast'; expected True, False or one of"):
        tiny_model().generate(torch.tensor([[5, 6]]), cache_implementation="static", compile="fast")


def test_each_compile_mode_compiles_its_own_graph(monkeypatch, tmp_path, capfd):
    """Dynamo keeps graphs per code object and its guards do not cover inductor's config: each mode
    must compile its own graph, not run the one another mode compiled first for the same model.
    max-autotune, which PyTorch cannot cache on CPU, says so and writes no entry; the default mode does."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LLAMA_PORT_COMPILE_CACHE", str(tmp_path))
    model, ids = tiny_model(), torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        eager = model.generate(ids, max_new_tokens=3, cache_implementation="static")
        graphs = counters["stats"]["unique_graphs"]
        for mode in ("max-autotune", True):
            tokens = model.generate(ids, max_new_tokens=3, cache_implementation="static", compile=mode)
            assert torch.equal(tokens, eager), mode
    assert counters["stats"]["unique_graphs"] - graphs == 2
    stderr = capfd.readouterr().err
    assert stderr.count("compile='max-autotune' compiles in every process") == 1, stderr
    assert stderr.count(f"compiling the decode step (first call; cached in {tmp_path})") == 1, stderr
    assert len(artifacts(tmp_path)) == 1  # the default mode's entry only


def test_default_mode_sees_weights_changed_in_place_after_compiling():
    """compile=True does not freeze: the weights are graph inputs, so an in-place update (a training
    step, a LoRA merge) is decoded with, without recompiling."""
    model, ids = tiny_model(), torch.tensor([[5, 6, 7]])
    kwargs = dict(max_new_tokens=6, cache_implementation="static", eos_token_id=[])
    with torch.inference_mode():
        before = model.generate(ids, compile=True, **kwargs)
        assert torch.equal(before, model.generate(ids, **kwargs))
        torch.manual_seed(1)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
        eager = model.generate(ids, **kwargs)
        assert not torch.equal(eager, before)  # the change really changes the tokens
        assert torch.equal(model.generate(ids, compile=True, **kwargs), eager)
