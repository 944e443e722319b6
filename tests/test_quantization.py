"""Weight-only int8 (llama_port.quantization, issue 14): per-channel scales within half a step,
Int8Linear against the dequantized weight, the real SmolLM2 against transformers' float model (KL
and top-1, printed), from_pretrained(quantize="int8") equal to model.quantize(), save and reload
bit-identical, foreign quantization configs and bad values refused, greedy generation on both
caches, and ``llama-port parity --quantize int8``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import IDS, make_hf_model, make_tiny_pair, tiny_config_dict
from safetensors.torch import load_file

from llama_port import LlamaForCausalLM, cli
from llama_port.checkpoints.errors import UnsupportedCheckpointError
from llama_port.parity.compare import logit_metrics
from llama_port.quantization import (
    KERNEL_MAX_ROWS,
    Int8Linear,
    quantize_per_channel,
    quantize_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny float32 Hub checkpoint with biases (transformers' save_pretrained)."""
    folder = tmp_path_factory.mktemp("tiny_fp32")
    make_hf_model(tiny_config_dict(attention_bias=True, mlp_bias=True)).save_pretrained(folder)
    return folder


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------- the format
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_channel_scales_within_half_a_step(dtype):
    ours, _ = make_tiny_pair(dtype=dtype)
    floats = {name: m.weight.detach().clone() for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_weights(ours, "int8")
    assert set(floats) == {f"model.layers.{i}.{p}.{n}" for i in range(2) for p, names in
                           (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for n in names} | {"lm_head"}  # fmt: skip
    state = ours.state_dict()
    for name, weight in floats.items():
        q, scale = state[f"{name}.weight"], state[f"{name}.weight_scale"]
        assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape == (weight.shape[0],)
        assert scale.dtype == torch.bfloat16  # the kernel's input dtype, for float32 and bfloat16 models
        assert int(q.abs().max()) == 127 and int(q.min()) >= -127
        amax = weight.float().abs().amax(dim=1)
        torch.testing.assert_close(scale, (amax / 127).to(torch.bfloat16), rtol=0, atol=0)
        error = (q.float() * scale.float()[:, None] - weight.float()).abs().amax(dim=1)  # per row
        assert (error <= scale.float() / 2 * (1 + 1e-6)).all(), name


def test_all_zero_row_and_module_contract():
    linear = torch.nn.Linear(8, 3, bias=True)
    with torch.no_grad():
        linear.weight[1] = 0.0
    module = Int8Linear.from_linear(linear)
    q, scale = quantize_per_channel(linear.weight, torch.bfloat16)
    assert torch.equal(module.weight, q) and scale[1] == 1.0 and not q[1].any()
    assert not any(p.requires_grad for p in module.parameters())
    assert [n for n, _ in module.named_parameters()] == ["weight", "weight_scale", "bias"]
    with pytest.raises(RuntimeError, match="inference-only"):
        module(torch.randn(2, 8, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 6, KERNEL_MAX_ROWS + 5])  # the kernel, in 2 blocks, the dense path
def test_int8_linear_equals_the_dequantized_forward(dtype, rows):
    """Against F.linear with the dequantized weight in float32 on the same (bfloat16-rounded) input:
    what is left is the output's one rounding to bfloat16 (relative 2^-8) and summation order."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True).to(dtype)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(2, rows, 96, dtype=dtype)
    with torch.no_grad():
        out = module(x)
        expected = F.linear(x.bfloat16().float(), module.dequantized_weight(torch.float32)) + module.bias.float()
    assert out.dtype == dtype and out.shape == (2, rows, 40)
    error = (out.float() - expected).abs().max().item()
    print(f"[int8] Int8Linear {dtype} rows={rows}: max |diff| {error:.2e} (max |y| {expected.abs().max():.2f})")
    assert error <= 2**-7 * expected.abs().max().item()


# -------------------------------------------------------------------------- the real checkpoint
def test_smollm2_int8_against_transformers_fp32(smollm2_pair, smollm2_gguf):
    """KL and top-1 agreement of the int8 SmolLM2 against transformers' float32 model on real text,
    lm_head quantized (the default) and kept float; from_pretrained(quantize="int8") is
    model.quantize() exactly."""
    hf, ours, tokenizer = smollm2_pair
    prompts = ["The capital of France is Paris, and the capital of Germany is", "def fibonacci(n):\n    return",
               "Water boils at 100 degrees Celsius at sea level, but on a mountain"]  # fmt: skip
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        reference = hf(**batch).logits[real]
    loaded = LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype=torch.float32, quantize="int8")
    figures = {}
    for name, model in (("lm_head int8", loaded), ("lm_head fp32", copy.deepcopy(ours).quantize(skip=("lm_head",)))):
        with torch.no_grad():
            metrics = logit_metrics(model(**batch).logits[real], reference)
        figures[name] = metrics
        print(f"[int8] SmolLM2 {name} vs transformers fp32 over {int(real.sum())} tokens: KL max {metrics.kl_max:.4f}, "
              f"top-1 {metrics.top1_agreement:.3f}, top-5 {metrics.top5_agreement:.3f}, max |logit diff| "
              f"{metrics.max_abs_diff:.2f}")  # fmt: skip
        assert metrics.kl_max < 0.1 and metrics.top1_agreement >= 0.9
    assert isinstance(loaded.lm_head, Int8Linear) and loaded.model.embed_tokens.weight.dtype == torch.float32
    assert not loaded.config.tie_word_embeddings  # the head is an int8 copy of the embedding
    assert torch.equal(logits(loaded, batch.input_ids), logits(copy.deepcopy(ours).quantize("int8"), batch.input_ids))


# ----------------------------------------------------------------------------- loading, saving
@pytest.mark.parametrize("tied", [False, True])
def test_save_and_reload_identical_logits(tmp_path, tiny_folder, tied):
    source = tiny_folder
    if tied:
        source = tmp_path / "tied"
        make_hf_model(tiny_config_dict(tie_word_embeddings=True)).save_pretrained(source)
    model = LlamaForCausalLM.from_pretrained(source, quantize="int8")
    assert torch.equal(logits(model), logits(LlamaForCausalLM.from_pretrained(source).quantize("int8")))
    model.save_pretrained(tmp_path / "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "llama_port", "bits": 8, "group": "per_channel",
                                             "symmetric": True, "modules_not_converted": []}  # fmt: skip
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    tensors = load_file(tmp_path / "int8" / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["lm_head.weight"].dtype == torch.int8 and tensors["lm_head.weight_scale"].shape == (128,)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "int8")
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, Int8Linear)
    assert torch.equal(logits(reloaded), logits(model))
    half = LlamaForCausalLM.from_pretrained(tmp_path / "int8", dtype=torch.float16)  # scales converted
    assert half.lm_head.weight_scale.dtype == torch.float16 and half.lm_head.weight.dtype == torch.int8


def test_skipped_head_is_saved_float_and_stays_tied(tmp_path):
    ours, _ = make_tiny_pair(tie_word_embeddings=True)
    ours.quantize("int8", skip=("lm_head",))
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules_not_converted"] == ["lm_head"]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")  # make_tiny_pair's
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits(reloaded), logits(ours))


@pytest.mark.parametrize(
    "quantization_config, message",
    [
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "quant_method='bitsandbytes'"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
        ({"quant_method": "llama_port", "bits": 4, "group": "per_channel", "symmetric": True}, "llama_port's int8 format is"),
    ],
)
def test_foreign_quantization_config_refused(tmp_path, tiny_folder, quantization_config, message):
    folder = tmp_path / "q"
    LlamaForCausalLM.from_pretrained(tiny_folder).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with pytest.raises(UnsupportedCheckpointError, match=message):
        LlamaForCausalLM.from_pretrained(folder)


def test_float_weights_under_an_int8_config_refused(tmp_path, tiny_folder):
    """A float checkpoint whose config.json claims llama_port's int8 format: never cast to int8."""
    folder = tmp_path / "lying"
    LlamaForCausalLM.from_pretrained(tiny_folder).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    claimed = {"quant_method": "llama_port", "bits": 8, "group": "per_channel", "symmetric": True}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": claimed}))
    with pytest.raises(UnsupportedCheckpointError, match="has dtype float32; the quantized model stores it as int8"):
        LlamaForCausalLM.from_pretrained(folder)


def test_bad_values_and_combinations_refused(tiny_folder):
    with pytest.raises(ValueError, match=r"quantize='int4'; expected one of \['int8'\]"):
        LlamaForCausalLM.from_pretrained(tiny_folder, quantize="int4")
    with pytest.raises(ValueError, match=r"quantize='fp8'; expected one of \['int8'\]"):
        LlamaForCausalLM.from_pretrained(tiny_folder).quantize("fp8")
    with pytest.raises(ValueError, match="with device_map='auto'"):
        LlamaForCausalLM.from_pretrained(tiny_folder, quantize="int8", device_map="auto")
    with pytest.raises(ValueError, match="runs on the CPU"):
        LlamaForCausalLM.from_pretrained(tiny_folder, quantize="int8", device="meta")
    with pytest.raises(ValueError, match=r"^quantization_config=dict: .*quantize= one of \['int8'\]"):
        LlamaForCausalLM.from_pretrained(tiny_folder, quantization_config={"load_in_8bit": True})
    model = LlamaForCausalLM.from_pretrained(tiny_folder, quantize="int8").train()
    with pytest.raises(RuntimeError, match="inference-only"):  # training: gradients would need the kernel's derivative
        model.model(inputs_embeds=torch.randn(1, 3, 64, requires_grad=True))


def test_greedy_generate_static_and_dynamic(tiny_folder):
    model = LlamaForCausalLM.from_pretrained(tiny_folder, quantize="int8")
    prompt = IDS[:1, :5]
    static = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[], cache_implementation="static")
    dynamic = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[])
    assert static.shape == (1, 17) and torch.equal(static, dynamic)
    # Each greedy token is the argmax of a full uncached forward over the sequence so far.
    full = logits(model, static[:, :-1])[0, 4:].argmax(-1)
    assert torch.equal(full, static[0, 5:])


# -------------------------------------------------------------------------------- the parity tool
def test_parity_cli_quantize_int8(tiny_folder, capsys):
    argv = ["parity", str(tiny_folder), "--quantize", "int8", "--kl-max", "0.05", "--json", "-", "--quiet",
            "--max-new-tokens", "4", "--seq-len", "12", "--batch", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "PASS: llama_port int8 is within KL 0.05 of transformers' unquantized model" in captured.err
    report = json.loads(captured.out)
    assert report["passed"] and report["quantize"] == "int8" and report["kl_limit"] == 0.05 and report["atol"] is None
    assert 0 < report["kl_max"] < 0.05 and report["top1_agreement"] > 0.9
    assert any("quantized int8" in note for note in report["notes"])
    assert cli.main(argv[:-6] + ["--kl-max", "1e-12", "--json", "-", "--quiet"]) == 1  # the KL bound decides
    assert "max KL(reference || ours)" in json.loads(capsys.readouterr().out)["failures"][0]
    print(f"[int8] parity --quantize int8 (tiny): KL max {report['kl_max']:.2e}, top-1 {report['top1_agreement']:.3f}")


@pytest.mark.parametrize("extra, message", [([], "give the KL you allow (--kl-max KL)"),
                                            (["--kl-max", "1", "--stream"], "not with --against or --stream")])
def test_parity_cli_quantize_refused_before_loading(tiny_folder, capsys, extra, message):
    assert cli.main(["parity", str(tiny_folder), "--quantize", "int8", "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err


def test_quantize_twice_changes_nothing_more():
    ours, _ = make_tiny_pair()
    ours.quantize("int8", skip=("lm_head",))
    before = {name: t.clone() for name, t in ours.state_dict().items()}
    ours.quantize("int8", skip=("lm_head",))
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ours.quantize("int8")  # converts what the first call skipped, and only that
    assert isinstance(ours.lm_head, Int8Linear) and ours.config.quantization_config["modules_not_converted"] == []
    assert torch.equal(ours.state_dict()["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
