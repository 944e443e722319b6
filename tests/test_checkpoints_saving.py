"""Writing checkpoints: save_pretrained round trips (safetensors and .bin, single and sharded, read
back by us and by transformers), tied and bf16 saves, saving over the folder a model was loaded from,
loaded weights staying private to the model, a save replacing an earlier one, and convert_checkpoint
from a Hub folder, from .bin shards and from the real SmolLM2 GGUF with its tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ATOL, hf_load, logits_of, make_hf_model, max_diff, tiny_config_dict

from llama_port import LlamaForCausalLM
from llama_port.checkpoints import convert_checkpoint, load_tokenizer

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402


# ---------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_save_pretrained_round_trip(tmp_path, layouts, safe, shard):
    ours = LlamaForCausalLM.from_pretrained(layouts["single"], attn_implementation="eager")
    out = ours.save_pretrained(tmp_path, max_shard_size=shard or "5GB", safe_serialization=safe)
    names = sorted(p.name for p in out.iterdir())
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if shard is None:
        assert names == ["config.json", "generation_config.json", f"{stem}.{ext}"]
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


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


def test_convert_carries_a_standalone_chat_template(tmp_path, layouts):
    """transformers 5 writes the chat template to chat_template.jinja; convert must not drop it."""
    src = Path(shutil.copytree(layouts["single"], tmp_path / "src"))
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    (src / "chat_template.jinja").write_text(template)
    dst = convert_checkpoint(src, tmp_path / "out")
    assert (dst / "chat_template.jinja").read_text() == template
