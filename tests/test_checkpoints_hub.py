"""Loading Hub-format checkpoints with from_pretrained: every weight layout, legacy and current config
keys, dtypes, tied embeddings, strict and missing keys, device and device_map (disk offload included),
a CheckpointSource as the argument, and the progress bar.

Each checkpoint is written by transformers (or by hand where transformers no longer writes the
layout, .bin) from a tiny random model; our logits after loading are compared with transformers'.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ATOL, IDS, hf_load, make_hf_model, max_diff, report_max_diff, tiny_config_dict

from llama_port import LlamaConfig, LlamaForCausalLM, LlamaModel
from llama_port.checkpoints import CheckpointSource, MissingKeysError, open_checkpoint

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


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


def test_untied_config_without_head_is_a_missing_key_unless_strict_false(tmp_path, hf_model):
    """Issue 13, item 14: tying stays the config's call; strict=False ties with a warning."""
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingKeysError, match=r"lacks 1 tensors the model needs: \['lm_head.weight'\].*tie_word_embeddings=false"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no lm_head.weight; tying"):
        ours = LlamaForCausalLM.from_pretrained(tmp_path, strict=False)
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



# ----------------------------------------------------------------------- sources, progress
def test_from_pretrained_accepts_a_source(layouts, hf_model):
    source = open_checkpoint(layouts["sharded"])
    assert isinstance(source, CheckpointSource) and source.format == "safetensors"
    assert source.num_groups == len(list(source.iter_groups())) >= 2 + 3  # per layer (per file), embed, norm, head
    ours = LlamaForCausalLM.from_pretrained(source, attn_implementation="eager")
    assert max_diff("from a CheckpointSource", ours, hf_model) <= ATOL


def test_models_from_one_source_keep_their_own_configs(layouts):
    """A load writes its model's config (dtype, backend, an int8 head's tie); the source's config and
    a config passed in stay as they were, so a second model from the same source is not relabelled."""
    source = open_checkpoint(layouts["single"])
    before = source.config.to_dict()
    fp32 = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
    bf16 = LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert (fp32.config.dtype, fp32.attn_implementation) == ("float32", "eager")
    assert (bf16.config.dtype, bf16.attn_implementation) == ("bfloat16", "sdpa")
    assert fp32.config is not bf16.config and source.config.to_dict() == before
    given = LlamaConfig.from_pretrained(layouts["single"])
    LlamaForCausalLM.from_pretrained(layouts["single"], config=given, dtype=torch.bfloat16)
    assert given.to_dict() == LlamaConfig.from_pretrained(layouts["single"]).to_dict()


def test_progress_bar(layouts, capsys):
    LlamaForCausalLM.from_pretrained(layouts["sharded"], progress=True)
    assert "loading sharded" in capsys.readouterr().err
    LlamaForCausalLM.from_pretrained(layouts["sharded"])  # not a terminal: silent
    LlamaForCausalLM.from_pretrained(layouts["sharded"], progress=False)
    assert capsys.readouterr().err == ""


def test_address_space_grows_by_the_checkpoint_once(tmp_path):
    """Issue 13, item 10: one memory map per file, not one per layer group (which took SmolLM2's
    0.54 GB to a 17 GB VmPeak and failed under ``ulimit -v``). Measured in a fresh interpreter."""
    import subprocess
    import sys

    hf = make_hf_model(tiny_config_dict(num_hidden_layers=24, hidden_size=128, intermediate_size=256))
    hf.save_pretrained(tmp_path)
    size_mb = (tmp_path / "model.safetensors").stat().st_size / 2**20
    code = (
        "import sys, torch\n"
        "def vm_peak():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmPeak:')) / 1024\n"
        "from llama_port import LlamaForCausalLM\n"
        "torch.ones(1) + 1\n"  # torch's own first-use allocations, before the measurement
        "before = vm_peak()\n"
        "LlamaForCausalLM.from_pretrained(sys.argv[1], dtype='auto', progress=False)\n"
        "print(vm_peak() - before)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, check=True)
    growth_mb = float(run.stdout.strip().splitlines()[-1])
    print(f"[memory] checkpoint {size_mb:.1f} MB in 25 groups: VmPeak grew {growth_mb:.1f} MB while loading")
    assert growth_mb < 3 * size_mb + 16  # one map of the file plus the model's own small buffers
