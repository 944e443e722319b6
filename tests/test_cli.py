"""The llama-port command (llama_port.cli.main): convert and its exit code 2 on a broken checkpoint,
parity's JSON, plot, exit codes 1 and 2 on tiny checkpoints and its end-to-end run on SmolLM2, and
generate streaming the greedy text of the real SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import JSON_KEYS, NUM_LAYERS, copy_of, make_hf_model, tiny_config_dict

from llama_port import cli
from llama_port.cli import parity as parity_command

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- convert
def test_cli_convert(tmp_path, layouts):
    from llama_port.cli import main

    assert main(["convert", str(layouts["sharded"]), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"].dtype == torch.float16


def test_cli_exit_code_2_with_the_reason(tmp_path, saved, capsys):
    from llama_port.cli import main

    folder = copy_of(saved, "single", tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert "file is truncated" in capsys.readouterr().err


# --------------------------------------------------------------------- parity, tiny checkpoint
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Hub-format folder (config.json + model.safetensors, no tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_hf_model(tiny_config_dict(num_hidden_layers=NUM_LAYERS)).save_pretrained(folder)
    return folder


def test_cli_json_to_stdout_and_plot(tiny_checkpoint, tmp_path, capsys):
    png = tmp_path / "layers.png"
    argv = ["parity", str(tiny_checkpoint), "--json", "-", "--plot", str(png), "--max-new-tokens", "4",
            "--seq-len", "12", "--batch", "3", "--attn", "eager"]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the JSON alone
    assert "PASS" in captured.err and "per layer" in captured.err  # the table went to stderr
    assert JSON_KEYS <= set(report)
    assert report["passed"] and report["backend"] == "eager" and report["num_positions"] > 0
    assert any("no tokenizer" in note for note in report["notes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exit_1_names_the_layer(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    load_ours = parity_command.load_model

    def load_broken(*args, **kwargs):
        model = load_ours(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[2].self_attn.o_proj.weight[1, 1] += 1.0
        return model

    monkeypatch.setattr(parity_command, "load_model", load_broken)
    out = tmp_path / "report.json"
    assert cli.main(["parity", str(tiny_checkpoint), "--json", str(out), "--max-new-tokens", "2", "--quiet"]) == 1
    report = json.loads(out.read_text())
    assert not report["passed"] and report["first_divergent_layer"] == 2
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["parity", "/nonexistent/model.gguf"], "no such file"),
        (["parity", "{empty}"], "no config.json"),
        (["parity", "{empty}", "--seq-len", "0"], "--seq-len"),
        (["parity", "{empty}", "--device", "cuda", "--attn", "flash_attention_2"], "cuda"),
    ],
)
def test_cli_bad_input_exits_2(argv, message, tmp_path, capsys):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("CUDA is available here")
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama-port parity: error:") and message in err.lower() and "\n" not in err


def test_cli_unknown_dtype_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["parity", "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


# ---------------------------------------------------------------------- the real SmolLM2-135M
@pytest.mark.slow
def test_smollm2_float32_passes(smollm2_gguf, tmp_path, capsys):
    out, png = tmp_path / "parity.json", tmp_path / "parity.png"
    argv = ["parity", "--json", str(out), "--plot", str(png), "--max-new-tokens", "8", "--batch", "2",
            "--seq-len", "24", "--quiet"]  # fmt: skip
    code = cli.main(argv)  # no CHECKPOINT: the embedded default, which is this file
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    print(table)
    assert code == 0, report["failures"]
    assert JSON_KEYS <= set(report)
    assert report["checkpoint"] == str(smollm2_gguf.resolve())
    assert (report["dtype"], report["device"], report["backend"]) == ("float32", "cpu", "sdpa")
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["kl_max"] <= 1e-8
    assert report["top1_agreement"] == 1.0 and report["greedy_match"] is True
    assert report["first_divergent_layer"] is None and report["first_token_mismatch"] is None
    assert len(report["reference_tokens"]) == 8 or 2 in report["reference_tokens"]  # 8 tokens or EOS
    assert [e["name"] for e in report["per_layer"][1:31]] == [f"layers.{i}" for i in range(30)]
    assert all(e["max_abs_diff"] <= 1e-4 for e in report["per_layer"])
    assert report["num_positions"] > 2 * 12  # the prompts and the random rows, pads excluded
    import transformers

    assert len(report["weights_sha256"]) == 64 and report["transformers_version"] == transformers.__version__
    assert "PASS" in table and png.stat().st_size > 10_000


@pytest.mark.slow
def test_cli_generate_streams_the_greedy_text(smollm2_pair, capsys):
    from llama_port.cli import main

    _, ours, tokenizer = smollm2_pair
    prompt = "The capital of France is"
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "12", "--cache", "static"]) == 0
    captured = capsys.readouterr()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = ours.generate(ids, max_new_tokens=12, eos_token_id=[2])
    assert captured.out == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    assert "tokens/s" in captured.err


# ------------------------------------------------------------------------------------ the parser
def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    import llama_port

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"llama-port {llama_port.__version__}"
    run = subprocess.run([sys.executable, "-m", "llama_port", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"llama-port {llama_port.__version__}"


def test_every_option_has_help_text():
    import argparse

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"parity", "generate", "convert", "bench"}
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in [("llama-port", parser), *subparsers.choices.items()]
        for action in sub._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert not missing


def test_attn_choices_come_from_the_backend_registry():
    from llama_port.attention import BACKENDS

    parser = cli.build_parser()
    args = parser.parse_args(["parity", "--attn", "flash_reference"])
    assert args.attn == "flash_reference"
    parity_parser = parser._subparsers._group_actions[0].choices["parity"]
    attn = next(a for a in parity_parser._actions if a.dest == "attn")
    assert list(attn.choices) == sorted(BACKENDS)


# ------------------------------------------------------------- issue 13: refused before the run
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seq-len", "100000000"], "--seq-len 100000000 exceeds the checkpoint's max_position_embeddings=64"),
        (["--batch", "100000000"], "--batch 100000000 x --seq-len 32 needs about"),
        (["--json", "{tmp}"], "is a folder; give a file path"),
        (["--plot", "{tmp}/missing/plot.png"], "does not exist"),
    ],
)
def test_parity_refuses_before_loading(tiny_checkpoint, tmp_path, monkeypatch, capsys, extra, message):
    """Item 8 and item 17's --json: refused in well under a second, before any model is loaded."""
    import time

    from llama_port.cli import parity as parity_command

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(parity_command, "load_reference", no_load)
    monkeypatch.setattr(parity_command, "load_model", no_load)
    argv = ["parity", str(tiny_checkpoint), "--quiet"] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    start = time.perf_counter()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and time.perf_counter() - start < 5
