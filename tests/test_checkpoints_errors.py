"""Bad checkpoints: each raises its own error type, with a message naming the file or tensor."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_of

from llama_port import LlamaForCausalLM
from llama_port.checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    convert_checkpoint,
)

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


def edit_state(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_error_types_are_builtin_ones_too():
    """The CLI maps ValueError / FileNotFoundError to exit code 2; every checkpoint error is one of them."""
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    for cls in (CorruptCheckpointError, ShapeMismatchError, MissingKeysError, UnexpectedKeysError,
                UnsafeCheckpointError, UnsupportedCheckpointError):
        assert issubclass(cls, ValueError) and issubclass(cls, CheckpointError)


# ------------------------------------------------------------------------------- not found
def test_no_such_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file or folder"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_folder_without_config_or_params(tmp_path, saved):
    shutil.copy(saved["single"] / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"no config\.json .* params\.json"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_config_without_weights(tmp_path, saved):
    shutil.copy(saved["single"] / "config.json", tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json but no weights.*model\.safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_shard_named_in_index_but_absent(tmp_path, saved):
    folder = copy_of(saved, "sharded", tmp_path)
    (folder / "model-00002-of-00004.safetensors").unlink()
    expected = r"model\.safetensors\.index\.json: names shard 'model-00002-of-00004\.safetensors'"
    with pytest.raises(CheckpointNotFoundError, match=expected):
        LlamaForCausalLM.from_pretrained(folder)


def test_hub_repo_not_in_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match=r"org/absent-model: not a local path.*HF_HUB_OFFLINE"):
        LlamaForCausalLM.from_pretrained("org/absent-model", cache_dir=tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="local_files_only=True"):
        LlamaForCausalLM.from_pretrained("org/absent-model", cache_dir=tmp_path, local_files_only=True)


# --------------------------------------------------------------------------------- corrupt
def test_truncated_safetensors(tmp_path, saved):
    folder = copy_of(saved, "sharded", tmp_path)
    shard = folder / "model-00003-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptCheckpointError, match=r"model-00003-of-00004\.safetensors: file is truncated"):
        LlamaForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:5], "file is truncated"),
        (lambda data: (10**12).to_bytes(8, "little") + data[8:], "header length"),
        (lambda data: data[:8] + b"{not json" + data[17:], "header is not valid JSON"),
        (lambda data: b"\x00" * len(data), "header is not valid JSON"),
        (lambda data: data + b"\x00" * 16, "file has trailing bytes"),
    ],
    ids=["tiny", "huge-header", "bad-json", "zeros", "trailing"],
)
def test_corrupted_safetensors(tmp_path, saved, damage, message):
    folder = copy_of(saved, "single", tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        LlamaForCausalLM.from_pretrained(folder)
    assert str(path) in str(info.value)


def test_corrupted_config(tmp_path, saved):
    folder = copy_of(saved, "single", tmp_path)
    (folder / "config.json").write_text("{ nope")
    with pytest.raises(CorruptCheckpointError, match=r"config\.json: not valid JSON"):
        LlamaForCausalLM.from_pretrained(folder)


def test_truncated_bin(tmp_path, saved):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(saved["single"] / "config.json", folder)
    torch.save(load_file(saved["single"] / "model.safetensors"), folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch file"):
        LlamaForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------------ shapes, keys
def test_shape_does_not_match_config(tmp_path, saved):
    folder = copy_of(saved, "sharded", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError) as info:
        LlamaForCausalLM.from_pretrained(folder)
    message = str(info.value)
    print(message)
    tensor = r"tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight'"
    assert re.search(rf"\.safetensors: {tensor} has shape \((64, 112|112, 64)\)", message)
    assert "intermediate_size=96" in message and re.search(r"needs \((64, 96|96, 64)\)", message)


def test_missing_keys_listed(tmp_path, saved):
    folder = copy_of(saved, "single", tmp_path)
    edit_state(folder, lambda s: (s.pop("model.layers.1.self_attn.k_proj.weight"), s.pop("model.norm.weight")))
    expected = r"lacks 2 tensors.*'model\.layers\.1\.self_attn\.k_proj\.weight', 'model\.norm\.weight'"
    with pytest.raises(MissingKeysError, match=expected) as info:
        LlamaForCausalLM.from_pretrained(folder)
    assert info.value.keys == ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight"]


def test_unexpected_keys_listed(tmp_path, saved):
    folder = copy_of(saved, "single", tmp_path)
    edit_state(folder, lambda s: s.update({"model.layers.0.mlp.gate_proj.bias": torch.zeros(112)}))
    expected = r"model\.safetensors: 1 tensors .*'model\.layers\.0\.mlp\.gate_proj\.bias'.*strict=False"
    with pytest.raises(UnexpectedKeysError, match=expected):
        LlamaForCausalLM.from_pretrained(folder)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.gate_proj\.bias"):
        LlamaForCausalLM.from_pretrained(folder, strict=False)


def test_index_entry_the_file_lacks(tmp_path, saved):
    folder = copy_of(saved, "sharded", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00004.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = r"model-00001-of-00004\.safetensors: the index puts tensor 'model\.layers\.0\.mlp\.extra\.weight' here"
    with pytest.raises(CorruptCheckpointError, match=expected):
        LlamaForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------------ unsafe
@pytest.mark.parametrize(
    "target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors"]
)
def test_index_pointing_outside_the_folder(tmp_path, saved, target):
    folder = copy_of(saved, "sharded", tmp_path)
    shutil.copy(folder / "model-00001-of-00004.safetensors", tmp_path / "outside.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = target
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = r"index\.json: weight_map names .* outside the checkpoint folder"
    with pytest.raises(UnsafeCheckpointError, match=expected) as info:
        LlamaForCausalLM.from_pretrained(folder)
    assert repr(target) in str(info.value)


class RunsCode:
    """Unpickling this would call open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_not_run(tmp_path, saved, writer):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(saved["single"] / "config.json", folder)
    marker = tmp_path / "pwned"
    payload = {"model.embed_tokens.weight": torch.zeros(128, 64), "boom": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:  # the legacy, non-zip format: no memory map possible, still weights_only
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin: refused: the pickle would call code"):
        LlamaForCausalLM.from_pretrained(folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ unsupported
def write_gguf(path: Path, architecture: str, quant_type=None) -> Path:
    import gguf
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    writer = gguf.GGUFWriter(str(path), architecture)
    if quant_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    else:
        _, type_size = GGML_QUANT_SIZES[quant_type]
        writer.add_tensor("token_embd.weight", np.zeros((4, type_size), np.uint8), raw_dtype=quant_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_another_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(UnsupportedCheckpointError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'"):
        LlamaForCausalLM.from_pretrained(path)


def test_gguf_with_an_unreadable_quant_type(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "q8_1.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedCheckpointError, match=r"q8_1\.gguf: tensor 'token_embd\.weight' has ggml type Q8_1"):
        LlamaForCausalLM.from_pretrained(path)


def test_other_model_type_and_quantized_hub_checkpoints(tmp_path, saved):
    folder = copy_of(saved, "single", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedCheckpointError, match=r"config\.json: model_type is 'gpt2'"):
        LlamaForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UnsupportedCheckpointError, match="quant_method='gptq'"):
        LlamaForCausalLM.from_pretrained(folder)


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"nothing")
    with pytest.raises(UnsupportedCheckpointError, match=r"weights\.npz: not a checkpoint file"):
        LlamaForCausalLM.from_pretrained(path)


# ----------------------------------------------------------------------------------------- convert
def test_failed_convert_leaves_no_weights_behind(tmp_path, saved):
    folder = copy_of(saved, "single", tmp_path)
    edit_state(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingKeysError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        convert_checkpoint(folder, tmp_path / "out", max_shard_size="60KB")  # several shards written by then
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "out").iterdir())


def test_convert_into_the_source_refused(tmp_path, saved):
    folder = copy_of(saved, "single", tmp_path)
    with pytest.raises(ValueError, match="is where the source checkpoint lives"):
        convert_checkpoint(folder, folder)


# ------------------------------------------------------------- issue 13: refused, not guessed
def test_config_claiming_more_layers_than_the_weights_is_refused_before_building(tmp_path, saved):
    """Item 7: num_hidden_layers 4000 (within the config's bounds) over a 2-layer checkpoint: refused
    from the headers, at once, not after building 4000 layers on the meta device."""
    import time

    for layout in ("single", "sharded"):
        folder = copy_of(saved, layout, tmp_path / layout)
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 4000
        (folder / "config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        with pytest.raises(CorruptCheckpointError, match=r"config\.json: num_hidden_layers=4000, but the weights "
                           r"hold decoder layers 0\.\.1 \(2 layers\)"):
            LlamaForCausalLM.from_pretrained(folder)
        assert time.perf_counter() - start < 5


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_weights_that_are_not_floating_are_refused(tmp_path, saved, dtype):
    """Item 12: an integer or bool weight is never cast to float silently."""
    folder = copy_of(saved, "single", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    edit_state(folder, lambda state: state.update({name: state[name].to(dtype)}))
    expected = rf"model\.safetensors: tensor '{re.escape(name)}' has dtype {str(dtype).removeprefix('torch.')}; weights must be floating"
    with pytest.raises(UnsupportedCheckpointError, match=expected):
        LlamaForCausalLM.from_pretrained(folder)
    with pytest.raises(UnsupportedCheckpointError, match=expected):
        convert_checkpoint(folder, tmp_path / "converted")


def test_one_weight_under_two_spellings_is_refused(tmp_path, saved):
    """Item 13: 'model.layers.0...' and a bare 'layers.0...' would load whichever came last."""
    folder = copy_of(saved, "single", tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_state(folder, lambda state: state.update({name.removeprefix("model."): state[name] + 1}))
    with pytest.raises(CorruptCheckpointError, match=r"tensors '(model\.)?layers\.0\.self_attn\.q_proj\.weight' and "
                       r"'(model\.)?layers\.0\.self_attn\.q_proj\.weight' are both 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        LlamaForCausalLM.from_pretrained(folder)


def test_tensor_in_two_shards_is_named_as_such(tmp_path, saved):
    """Item 18: a tensor duplicated across shards was reported as the index's file 'lacking' it."""
    folder = copy_of(saved, "sharded", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    state = load_file(folder / other)
    state[name] = load_file(folder / index["weight_map"][name])[name]
    save_file(state, folder / other, metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match=rf"tensor '{re.escape(name)}' is also in .*; each tensor must be in one shard"):
        LlamaForCausalLM.from_pretrained(folder)


def test_float8_weights_load_only_converted(tmp_path, saved):
    """Item 16's reader side: float8 is read when converted to a dtype we compute in, as convert writes it."""
    folder = copy_of(saved, "single", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    edit_state(folder, lambda state: state.update({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}))
    with pytest.raises(UnsupportedCheckpointError, match=r"the weights are float8_e4m3fn, which llama_port does not "
                       r"compute in; load them converted: dtype=torch\.bfloat16"):
        LlamaForCausalLM.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    expected = load_file(folder / "model.safetensors")["model.norm.weight"].to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and torch.equal(model.model.norm.weight, expected)
