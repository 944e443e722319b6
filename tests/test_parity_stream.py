"""Layer-streaming parity and --against: compare_streaming gives compare()'s figures bit for bit
(the tiny-model matrix, SmolLM2), names a planted one-layer bug at its layer by the local errors,
keeps the loader's strictness; compare_checkpoints passes Meta-vs-HF and GGUF-F16-vs-HF of the same
weights, fails naming the layer of a conversion that left one q_proj interleaved, and judges a
quantised side by the error allowed; the parity command's --stream, automatic streaming, --against,
JSON keys, timing line and progress bar."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_MATRIX,
    copy_of,
    interleave_rope_rows,
    make_hf_model,
    report_max_diff,
    tiny_config_dict,
    write_gguf,
    write_meta_checkpoint,
)

from llama_port import cli
from llama_port.checkpoints import MissingKeysError, UnexpectedKeysError, open_checkpoint
from llama_port.checkpoints.meta import meta_ffn_hidden_dim
from llama_port.cli import parity as parity_command
from llama_port.parity import (
    PortLayers,
    ReferenceLayers,
    compare,
    compare_checkpoints,
    compare_streaming,
    left_pad,
    load_reference,
    random_batch,
)

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 12  # past 10, so a safetensors file holds the layers out of order (0, 1, 10, 11, 2, ...)
SEQ = 12  # past max_position_embeddings=8 of the dynamic-rope case
BUGGY_LAYER = 4
KEYS = ("max_abs_diff", "local_max_abs_diff", "mean_abs_diff", "threshold")


def batch(vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded rows of SEQ, each padded differently."""
    return left_pad(random_batch(vocab, batch=3, seq_len=SEQ, pad_token_id=0), 0, SEQ)


def per_layer(report) -> list[tuple]:
    return [(e.name, *(getattr(e, k) for k in KEYS)) for e in report.per_layer]


def whole_and_streamed(folder: Path, attn: str, **options):
    """compare() on the whole models and compare_streaming() on the same checkpoint and batch."""
    from llama_port.cli.common import load_model

    source = open_checkpoint(folder)
    ids, mask = batch()
    whole = compare(load_model(source, "float32", "cpu", attn), load_reference(source, "float32", "cpu", attn),
                    ids, mask, **options)  # fmt: skip
    streamed = compare_streaming(PortLayers(source, "float32", "cpu", attn), ReferenceLayers(source, "float32", "cpu", attn),
                                 ids, mask, dtype="float32", **options)  # fmt: skip
    return whole, streamed


def assert_same_report(whole, streamed, tokens: bool = True) -> None:
    """Every figure equal; the greedy tokens too unless ``tokens`` is False."""
    assert per_layer(whole) == per_layer(streamed)
    keys = ["max_abs_diff", "mean_abs_diff", "top1_agreement", "top5_agreement", "kl_max", "passed",
            "first_divergent_layer", "first_divergent_name", "num_positions", "greedy_match"]  # fmt: skip
    for key in keys + (["ours_tokens", "reference_tokens"] if tokens else []):
        assert getattr(whole, key) == getattr(streamed, key), key
    assert (whole.mode, streamed.mode, streamed.streamed) == ("whole", "stream", True)


# ------------------------------------------------------------------ streamed == whole, bit for bit
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(TINY_MATRIX))
def test_streaming_matches_whole_model_on_the_tiny_matrix(name, attn, tmp_path):
    make_hf_model(tiny_config_dict(num_hidden_layers=LAYERS, **TINY_MATRIX[name]), attn).save_pretrained(tmp_path)
    whole, streamed = whole_and_streamed(tmp_path, attn, max_new_tokens=3)
    report_max_diff(f"streamed {name} {attn}", streamed.max_abs_diff)
    # Past the original context, longrope's keys cached at the prompt keep its short factors, while
    # streamed greedy decoding (no cache) recomputes them with the long ones: other tokens, both sides alike.
    assert_same_report(whole, streamed, tokens="longrope" not in name)
    assert streamed.passed and streamed.greedy_match and len(streamed.ours_tokens) >= 1


def test_planted_bug_is_named_at_its_layer_when_streaming(tmp_path, monkeypatch):
    """A decoder layer that is wrong by itself: both modes name it by its local error, and agree."""
    from llama_port import modeling

    make_hf_model(tiny_config_dict(num_hidden_layers=LAYERS)).save_pretrained(tmp_path)
    forward = modeling.LlamaDecoderLayer.forward

    def buggy(self, hidden_states, *args):
        out, weights = forward(self, hidden_states, *args)
        if self.self_attn.layer_idx == BUGGY_LAYER:
            out = out + 0.01 * hidden_states
        return out, weights

    monkeypatch.setattr(modeling.LlamaDecoderLayer, "forward", buggy)
    whole, streamed = whole_and_streamed(tmp_path, "sdpa", max_new_tokens=0)
    assert_same_report(whole, streamed)
    assert not streamed.passed
    assert streamed.first_divergent_layer == BUGGY_LAYER
    local = {e.layer: e.local_max_abs_diff for e in streamed.per_layer if e.layer is not None}
    carried = {e.layer: e.max_abs_diff for e in streamed.per_layer if e.layer is not None}
    assert local[BUGGY_LAYER] > 1e-3 and all(v == 0.0 for k, v in local.items() if k != BUGGY_LAYER)
    assert min(carried[k] for k in range(BUGGY_LAYER, LAYERS)) > 1e-4  # the drift a user sees


def test_second_bug_under_drift_shows_in_the_local_errors(tmp_path, monkeypatch):
    """A loader bug in layer 1 drifts every later layer; a second one in layer 7 is hidden in the
    carried errors but not in the local ones."""
    from llama_port.parity import stream

    make_hf_model(tiny_config_dict(num_hidden_layers=LAYERS)).save_pretrained(tmp_path)
    read = stream.iter_parameter_tensors

    def perturbed(*args, **kwargs):
        for name, target, tensor in read(*args, **kwargs):
            if name in ("model.layers.1.mlp.up_proj.weight", "model.layers.7.self_attn.v_proj.weight"):
                tensor = tensor.clone()
                tensor[0] += 0.5
            yield name, target, tensor

    monkeypatch.setattr(stream, "iter_parameter_tensors", perturbed)
    source = open_checkpoint(tmp_path)
    report = compare_streaming(PortLayers(source, "float32"), ReferenceLayers(source, "float32"), *batch(), dtype="float32")
    over = [e.layer for e in report.per_layer if e.local_max_abs_diff > e.threshold]
    assert over == [1, 7] and report.first_divergent_layer == 1
    assert report.per_layer[1 + 7].max_abs_diff < 10 * report.per_layer[1 + 6].max_abs_diff  # no jump to see


def test_streaming_keeps_the_loaders_strictness(saved, tmp_path):
    folder = copy_of(saved, "single", tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    source = open_checkpoint(folder)
    with pytest.raises(UnexpectedKeysError, match="extra.weight"):
        compare_streaming(PortLayers(source, "float32"), ReferenceLayers(source, "float32"), *batch(), dtype="float32")
    del state["model.layers.1.extra.weight"], state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    source = open_checkpoint(folder)
    with pytest.raises(MissingKeysError, match="model.layers.1.mlp.up_proj.weight"):
        compare_streaming(PortLayers(source, "float32"), ReferenceLayers(source, "float32"), *batch(), dtype="float32")


def test_bfloat16_streaming_matches_whole_model(tmp_path):
    from llama_port.cli.common import load_model

    make_hf_model(tiny_config_dict(num_hidden_layers=LAYERS)).save_pretrained(tmp_path)
    source = open_checkpoint(tmp_path)
    ids, mask = batch()
    whole = compare(load_model(source, "bfloat16", "cpu", "sdpa"), load_reference(source, "bfloat16", "cpu", "sdpa"),
                    ids, mask, max_new_tokens=0, reference_fp32=load_reference(source, "float32", "cpu", "sdpa"))  # fmt: skip
    streamed = compare_streaming(PortLayers(source, "bfloat16"), ReferenceLayers(source, "bfloat16"), ids, mask,
                                 dtype="bfloat16", reference_fp32=ReferenceLayers(source, "float32"))  # fmt: skip
    assert_same_report(whole, streamed)
    assert (streamed.ours_error, streamed.reference_error) == (whole.ours_error, whole.reference_error)
    assert streamed.passed and streamed.ratio == 2.0


# --------------------------------------------------------------------------------- --against
META_PARAMS = dict(dim=64, n_layers=LAYERS, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, norm_eps=1e-5,
                   rope_theta=10000.0)  # fmt: skip


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    """One tiny model's weights (fp16-representable, so an F16 GGUF holds them exactly) as a Hub
    folder, a Meta checkpoint, an F16 and a Q8_0 GGUF, and a Hub folder whose layer BUGGY_LAYER
    q_proj was left in Meta's interleaved layout."""
    import gguf

    root = tmp_path_factory.mktemp("formats")
    intermediate = meta_ffn_hidden_dim(64, META_PARAMS["multiple_of"], None)
    hf = make_hf_model(tiny_config_dict(num_hidden_layers=LAYERS, intermediate_size=intermediate))
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(param.half().float())
    hf.save_pretrained(root / "hf")
    write_meta_checkpoint(root / "meta", hf, META_PARAMS)
    write_gguf(root / "f16.gguf", hf, gguf.GGMLQuantizationType.F16)
    write_gguf(root / "q8_0.gguf", hf, gguf.GGMLQuantizationType.Q8_0)
    hf.save_pretrained(root / "broken")
    state = load_file(root / "broken" / "model.safetensors")
    name = f"model.layers.{BUGGY_LAYER}.self_attn.q_proj.weight"
    state[name] = interleave_rope_rows(state[name], hf.config.num_attention_heads)
    save_file(state, root / "broken" / "model.safetensors", metadata={"format": "pt"})
    return {"hf": root / "hf", "meta": root / "meta", "f16": root / "f16.gguf", "q8_0": root / "q8_0.gguf",
            "broken": root / "broken"}  # fmt: skip


def against(formats, a: str, b: str, stream: bool = False, **options):
    return compare_checkpoints(open_checkpoint(formats[a]), open_checkpoint(formats[b]), *batch(), stream=stream,
                               max_new_tokens=0 if stream else 3, **options)  # fmt: skip


@pytest.mark.parametrize("a", ["meta", "f16"])
def test_against_passes_for_the_same_weights(formats, a):
    whole, streamed = against(formats, a, "hf"), against(formats, a, "hf", stream=True)
    report_max_diff(f"{a} against hf", whole.max_abs_diff)
    assert whole.passed and streamed.passed, whole.failures + streamed.failures
    assert whole.max_abs_diff == 0.0 and whole.greedy_match
    assert per_layer(whole) == per_layer(streamed)
    assert (whole.mode, streamed.mode, whole.streamed, streamed.streamed) == ("against", "against", False, True)
    assert whole.against == str(formats["hf"]) and "each read by llama_port's reader" in whole.notes[0]


@pytest.mark.parametrize("stream", [False, True])
def test_against_names_the_layer_of_a_broken_conversion(formats, stream):
    report = against(formats, "meta", "broken", stream=stream)
    assert not report.passed and report.first_divergent_layer == BUGGY_LAYER
    assert report.per_layer[BUGGY_LAYER].max_abs_diff == 0.0  # every layer before it agrees
    assert report.per_layer[1 + BUGGY_LAYER].local_max_abs_diff > 1e-2


def test_against_a_quantised_side_is_judged_by_the_error_allowed(formats):
    with pytest.raises(ValueError, match="Q8_0 blocks: give the error you allow"):
        against(formats, "q8_0", "hf")
    report = against(formats, "q8_0", "hf", kl_limit=1e-2)
    print(f"[parity] Q8_0 against hf: KL {report.kl_max:.2e}, max |diff| {report.max_abs_diff:.2e}")
    assert report.passed and report.atol is None and report.kl_limit == 1e-2 and 0 < report.kl_max < 1e-2
    assert report.first_divergent_layer is None  # no per-layer bound without --atol
    strict = against(formats, "q8_0", "hf", kl_limit=1e-12)
    assert not strict.passed and "kl_max" in strict.failures[0]


def test_against_refuses_two_different_models(formats, tmp_path):
    make_hf_model(tiny_config_dict(num_hidden_layers=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="are not one model: .*num_hidden_layers 12 vs 2"):
        compare_checkpoints(open_checkpoint(formats["hf"]), open_checkpoint(tmp_path), *batch())


# ---------------------------------------------------------------------------- the parity command
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_stream")
    make_hf_model(tiny_config_dict(num_hidden_layers=LAYERS)).save_pretrained(folder)
    return folder


def run_parity(argv: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str, str]:
    out = tmp_path / "report.json"
    code = cli.main(["parity", *argv, "--json", str(out), "--seq-len", "12", "--batch", "2"])
    captured = capsys.readouterr()
    return code, json.loads(out.read_text()), captured.out, captured.err


def test_cli_stream_json_keys_and_timing_line(checkpoint, tmp_path, capsys):
    code, report, out, _ = run_parity([str(checkpoint), "--stream"], tmp_path, capsys)
    assert code == 0 and report["mode"] == "stream" and report["streamed"] is True
    assert all({"local_max_abs_diff", "carried_max_abs_diff", "max_abs_diff"} <= set(e) for e in report["per_layer"])
    assert report["greedy_match"] is None and any("greedy generation skipped" in n for n in report["notes"])
    assert {"open", "reference", "tokenizer", "ours", "read", "compute"} <= set(report["timings"])
    assert "time per phase: open" in out and "streamed, one decoder layer at a time" in out
    code, report, _, _ = run_parity([str(checkpoint), "--stream", "--greedy-tokens", "3"], tmp_path, capsys)
    assert code == 0 and report["greedy_match"] is True and report["ours_tokens"] == report["reference_tokens"]


def test_cli_streams_when_two_whole_models_would_not_fit(checkpoint, tmp_path, capsys, monkeypatch):
    whole = parity_command._parity_bytes(open_checkpoint(checkpoint).config, 5, 12, 2, streamed=False)
    monkeypatch.setattr(parity_command, "_available_memory", lambda: whole - 1)
    code, report, _, err = run_parity([str(checkpoint), "--quiet"], tmp_path, capsys)
    assert code == 0 and report["mode"] == "stream"
    assert "comparing one decoder layer at a time (--no-stream forces the whole-model path)" in err
    assert cli.main(["parity", str(checkpoint), "--seq-len", "12", "--batch", "2", "--no-stream"]) == 2
    assert "needs about" in capsys.readouterr().err


def test_cli_against(formats, tmp_path, capsys):
    code, report, out, _ = run_parity([str(formats["meta"]), "--against", str(formats["broken"]), "--stream",
                                       "--quiet"], tmp_path, capsys)  # fmt: skip
    assert code == 1 and report["mode"] == "against" and report["first_divergent_layer"] == BUGGY_LAYER
    assert "checkpoint A vs checkpoint B" in out and "FAIL" in out
    assert cli.main(["parity", str(formats["q8_0"]), "--against", str(formats["hf"]), "--quiet"]) == 2
    assert "--atol / --kl-max" in capsys.readouterr().err


def test_progress_bar_over_layers():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=100)
    with parity_command._Progress(console, enabled=True) as progress:
        with progress.bar("compare", "streaming", 3) as advance:
            for done in range(1, 4):
                advance(done, 3)
    drawn = console.file.getvalue()
    assert "━" in drawn and "3/3 layers" in drawn and "done streaming" in drawn and "compare" in progress.timings


# ------------------------------------------------------------------------------ the real SmolLM2
@pytest.mark.slow
def test_smollm2_streamed_matches_whole_model(smollm2_gguf, smollm2_pair):
    """The GGUF reference streamed through transformers' GGUF functions equals its whole load."""
    hf, ours, tokenizer = smollm2_pair
    source = open_checkpoint(smollm2_gguf)
    encoded = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    whole = compare(ours, hf, ids, mask, max_new_tokens=0, hash_weights=False)
    streamed = compare_streaming(PortLayers(source, "float32", attn=ours.attn_implementation),
                                 ReferenceLayers(source, "float32", attn=hf.config._attn_implementation), ids, mask,
                                 dtype="float32")  # fmt: skip
    assert per_layer(whole) == per_layer(streamed) and len(streamed.per_layer) == 30 + 3
    assert streamed.passed and streamed.max_abs_diff == whole.max_abs_diff <= 1e-4
