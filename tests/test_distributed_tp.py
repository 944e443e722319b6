"""Tensor parallelism (llama_port.distributed) on gloo ranks spawned by conftest.run_ranks.

Checkpoints and the single-process references are built in the parent; each worker loads with
``tp_plan="auto"`` and returns what the parent compares: logits of a left-padded batch against
transformers', greedy tokens against one process (both caches), how much of each weight a rank
holds and how its pieces are stored, a Meta 2-shard checkpoint read rank-to-rank, the real SmolLM2
GGUF at tp=3 and its refusal at tp=2, and the CLI under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_port
from conftest import (
    make_hf_model,
    report_max_diff,
    run_ranks,
    tiny_config_dict,
    write_meta_checkpoint,
    write_tiny_tokenizer,
)
from llama_port.parity import left_pad, random_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
NEW_TOKENS = 6
# GQA 4/2 heads with biases (column-wise ones split, row-wise ones replicated) and a tied head.
TP_CONFIG = tiny_config_dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


def padded_batch(vocab_size: int, pad: int, rows: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded (rows, length) batch, each row padded differently."""
    return left_pad(random_batch(vocab_size, rows, length, pad), pad, length)


def greedy(model, input_ids, attention_mask, cache: str) -> torch.Tensor:
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
        cache_implementation=cache,
    )


def sampled(model, input_ids, attention_mask) -> torch.Tensor:
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.5,
        top_k=0, seed=7,
    )


# ---------------------------------------------------------------------------------------- workers
def tp_worker(rank: int, world_size: int, path: str, input_ids, attention_mask) -> dict:
    """Load tensor-parallel; logits, greedy tokens with both caches, and what this rank holds. Also
    the other two ways in: device_mesh=, and parallelize() on a model loaded whole."""
    from torch.distributed.tensor import DTensor

    from llama_port.distributed import parallelize
    from llama_port.distributed.tensor_parallel import shard_dim

    model = llama_port.LlamaForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
    with_mesh = llama_port.LlamaForCausalLM.from_pretrained(path, device_mesh=model.device_mesh, dtype=torch.float32)
    built = parallelize(llama_port.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32), model.device_mesh)
    saved = model.save_pretrained(Path(path).parent / "saved-tp")  # collective: gathered, rank 0 writes
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        others = [m(input_ids, attention_mask=attention_mask).logits for m in (with_mesh, built)]
    held = {}
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        held[name] = dict(
            distributed=isinstance(param, DTensor), global_numel=param.numel(), local_numel=local.numel(),
            storage_bytes=local.untyped_storage().nbytes(), local_bytes=local.numel() * local.element_size(),
            shard_dim=shard_dim(param),
        )
    return dict(
        logits=logits,
        others_equal=[torch.equal(other, logits) for other in others],
        saved=str(saved),
        built_sharded=isinstance(built.model.layers[0].mlp.down_proj.weight, DTensor),
        dynamic=greedy(model, input_ids, attention_mask, "dynamic"),
        static=greedy(model, input_ids, attention_mask, "static"),
        sampled=sampled(model, input_ids, attention_mask),
        held=held,
        tied=model.lm_head.weight is model.model.embed_tokens.weight,
        tp_size=model.device_mesh.size(),
    )


def status_bytes(key: str) -> int:
    """A /proc/self/status field (VmHWM, VmRSS) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def meta_refusal_memory_worker(
    rank: int, world_size: int, meta_folder: str, smollm2: str, input_ids, wide_folder: str
) -> dict:
    """A Meta 2-shard checkpoint rank-to-rank; SmolLM2 (9/3 heads) refused at this tp size; the
    peak memory a tensor-parallel load of a wider safetensors checkpoint adds (VmHWM, reset first)."""
    from llama_port.checkpoints import open_checkpoint

    source = open_checkpoint(meta_folder)
    pieces = next(g for i, g in enumerate(source.iter_rank_groups(rank, world_size, lambda name: 0)) if i == 1)
    model = llama_port.LlamaForCausalLM.from_pretrained(meta_folder, tp_plan="auto", dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids).logits
    tokens = greedy(model, input_ids, torch.ones_like(input_ids), "static")
    # Measured after that small load (the imports are paid) and before anything large was freed
    # (freed memory would be reused without raising the high-water mark).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux)
    before = status_bytes("VmRSS")
    wide = llama_port.LlamaForCausalLM.from_pretrained(wide_folder, tp_plan="auto", dtype=torch.float32)
    load_peak = status_bytes("VmHWM") - before
    held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in wide.parameters())
    try:
        llama_port.LlamaForCausalLM.from_pretrained(smollm2, tp_plan="auto", dtype=torch.float32)
    except ValueError as err:
        refusal = str(err)
    else:
        refusal = None
    return dict(
        load_peak=load_peak, held=held, logits=logits, refusal=refusal, tokens=tokens,
        q_rows=pieces["model.layers.0.self_attn.q_proj.weight"].shape[0],
    )


def smollm2_worker(rank: int, world_size: int, path: str, input_ids, attention_mask) -> torch.Tensor:
    model = llama_port.LlamaForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    """A tiny checkpoint saved by transformers as sharded safetensors, and that transformers model."""
    hf = make_hf_model(TP_CONFIG, attn_implementation="sdpa")
    folder = tmp_path_factory.mktemp("tp") / "tiny"
    hf.save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder, hf


@pytest.fixture(scope="module")
def tp2(tp_checkpoint):
    folder, hf = tp_checkpoint
    input_ids, attention_mask = padded_batch(TP_CONFIG["vocab_size"], TP_CONFIG["pad_token_id"])
    results = run_ranks(tp_worker, 2, str(folder), input_ids, attention_mask, timeout=240)
    return results, hf, input_ids, attention_mask, folder


def test_tp2_logits_match_transformers_single_process(tp2):
    results, hf, input_ids, attention_mask, _ = tp2
    with torch.no_grad():
        reference = hf(input_ids, attention_mask=attention_mask).logits
    mask = attention_mask.bool()  # padded positions' logits are not compared (either model may differ there)
    for rank, result in enumerate(results):
        diff = (result["logits"] - reference)[mask].abs().max().item()
        assert report_max_diff(f"tp=2 rank {rank} vs transformers, left-padded", diff) <= ATOL
        assert result["tp_size"] == 2 and result["tied"]
        assert result["others_equal"] == [True, True] and result["built_sharded"]  # device_mesh=, parallelize()
    assert torch.equal(results[0]["logits"], results[1]["logits"])  # replicated head: identical on every rank


def test_tp2_save_pretrained_writes_the_full_checkpoint(tp2):
    """save_pretrained on every rank of a tensor-parallel model: one folder, the whole weights, read by
    transformers with its original model's logits exactly."""
    results, hf, input_ids, attention_mask, _ = tp2
    assert results[0]["saved"] == results[1]["saved"]
    import transformers

    reloaded = transformers.LlamaForCausalLM.from_pretrained(results[0]["saved"], attn_implementation="sdpa").eval()
    with torch.no_grad():
        ours = reloaded(input_ids, attention_mask=attention_mask).logits
        theirs = hf(input_ids, attention_mask=attention_mask).logits
    assert report_max_diff("transformers on the tp=2 save vs the original", (ours - theirs).abs().max().item()) == 0.0


@pytest.mark.parametrize("mode", ["dynamic", "static", "sampled"])
def test_tp2_generated_tokens_equal_one_process(tp2, mode):
    """Greedy with either cache, and seeded sampling: every rank's tokens are one process's."""
    results, _, input_ids, attention_mask, folder = tp2
    single = llama_port.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if mode == "sampled":
        expected = sampled(single, input_ids, attention_mask)
    else:
        expected = greedy(single, input_ids, attention_mask, mode)
    for result in results:
        assert torch.equal(result[mode], expected)


def test_each_rank_holds_half_of_the_decoder_and_only_its_pieces(tp2):
    results, *_ = tp2
    for result in results:
        held = result["held"]
        decoder = {name: h for name, h in held.items() if ".layers." in name}
        sharded = {name: h for name, h in decoder.items() if h["shard_dim"] is not None}
        # q/k/v/gate/up weights and biases, o/down weights: the plan's 7 Linear layers per decoder layer.
        assert len(sharded) == TP_CONFIG["num_hidden_layers"] * 12
        layer = "model.layers.0."
        assert {held[layer + f"{m}.weight"]["shard_dim"] for m in ("self_attn.q_proj", "mlp.up_proj")} == {0}  # columns
        assert {held[layer + f"{m}.weight"]["shard_dim"] for m in ("self_attn.o_proj", "mlp.down_proj")} == {1}  # rows
        for name, h in sharded.items():
            assert h["local_numel"] * 2 == h["global_numel"], name
            # A fresh tensor of the piece's own size: no storage of the whole weight was kept.
            assert h["storage_bytes"] == h["local_bytes"], name
        local = sum(h["local_numel"] for h in decoder.values())
        whole = sum(h["global_numel"] for h in decoder.values())
        print(f"decoder weights held by one rank: {local} of {whole} ({local / whole:.3f})")
        assert 0.5 <= local / whole < 0.51
        assert all(not h["distributed"] for name, h in held.items() if ".layers." not in name)  # embedding, norm


@pytest.fixture(scope="module")
def tp2_more(tmp_path_factory, smollm2_gguf):
    """One 2-rank run: a Meta 2-shard checkpoint, SmolLM2's refusal, a wider checkpoint's load peak."""
    from llama_port.checkpoints.meta import meta_ffn_hidden_dim

    root = tmp_path_factory.mktemp("tp_more")
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5,
                  rope_theta=500000.0)
    hf_config = tiny_config_dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=8192,
                                 intermediate_size=meta_ffn_hidden_dim(64, 32, None))
    hf = make_hf_model(hf_config, seed=5)
    meta = write_meta_checkpoint(root / "meta", hf, params, ranks=2)
    # 8 layers of hidden 256 / intermediate 1024: 31 MB of fp32 weights, almost all of them split.
    make_hf_model(tiny_config_dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8)).save_pretrained(
        root / "wide"
    )
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    results = run_ranks(meta_refusal_memory_worker, 2, str(meta), str(smollm2_gguf), input_ids, str(root / "wide"),
                        timeout=240)
    return results, hf, meta, input_ids, root / "wide" / "model.safetensors"


def test_meta_two_shards_load_rank_to_rank(tp2_more):
    results, hf, folder, input_ids, _ = tp2_more
    single = llama_port.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        reference = hf(input_ids).logits
    for rank, result in enumerate(results):
        assert result["q_rows"] == 64 // 2  # the rank's own file's piece, not the merged weight
        diff = (result["logits"] - reference).abs().max().item()
        assert report_max_diff(f"meta 2 shards, tp=2 rank {rank} vs transformers", diff) <= ATOL
        assert torch.equal(result["tokens"], greedy(single, input_ids, torch.ones_like(input_ids), "static"))


def test_smollm2_refused_at_tp2_naming_heads_and_sizes(tp2_more):
    for result in tp2_more[0]:
        refusal = result["refusal"]
        assert refusal is not None
        assert "num_attention_heads=9" in refusal and "num_key_value_heads=3" in refusal
        assert "tensor parallel size 2" in refusal and "[1, 3]" in refusal


def test_load_peak_is_about_the_rank_s_share(tp2_more):
    """Measured, not inferred: the RSS high-water mark a tp=2 load adds is about what the rank
    keeps (half the weights), well under the whole checkpoint a full read would touch."""
    results, *_, weights_file = tp2_more
    whole = weights_file.stat().st_size
    for rank, result in enumerate(results):
        print(f"rank {rank}: load peak {result['load_peak'] / 2**20:.1f} MiB, holds {result['held'] / 2**20:.1f} MiB "
              f"of a {whole / 2**20:.1f} MiB checkpoint")
        assert result["held"] < 0.52 * whole
        assert 0.9 * result["held"] < result["load_peak"] < 0.75 * whole


def test_smollm2_gguf_at_tp3_matches_transformers(smollm2_gguf):
    from llama_port.checkpoints import load_tokenizer
    from llama_port.parity import load_reference

    tokenizer = load_tokenizer(smollm2_gguf)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    results = run_ranks(smollm2_worker, 3, str(smollm2_gguf), batch["input_ids"], batch["attention_mask"], timeout=300)
    reference = load_reference(smollm2_gguf, "float32")
    with torch.no_grad():
        expected = reference(**batch).logits
    mask = batch["attention_mask"].bool()
    for rank, logits in enumerate(results):
        diff = (logits - expected)[mask].abs().max().item()
        assert report_max_diff(f"SmolLM2 GGUF tp=3 rank {rank} vs transformers", diff) <= 1e-4


def test_cli_under_torchrun_prints_once(tmp_path, capsys):
    """generate and parity with --tp-plan auto on 2 ranks: rank 0's output alone, generate's the same
    text as one process, parity passing."""
    hf = make_hf_model(tiny_config_dict(), seed=1)
    folder = tmp_path / "tiny"
    hf.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(llama_port.__file__).parent.parent)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    generate = ["-m", "llama_port", "generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "5",
                "--threads", "1"]

    def run(command: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stderr
        return done

    from llama_port.cli import main

    assert main(generate[2:]) == 0  # one process, in this one
    single = capsys.readouterr().out
    sharded = run([*torchrun, *generate, "--tp-plan", "auto"])
    print(json.dumps({"tp2": sharded.stdout, "single": single}))
    assert sharded.stdout == single and single.strip()
    assert sharded.stderr.count("tokens/s") == 1  # the timing line: rank 0 only
    parity = run([*torchrun, "-m", "llama_port", "parity", str(folder), "--tp-plan", "auto", "--max-new-tokens", "3"])
    assert parity.stdout.count("PASS") == 1 and parity.stdout.count("llama_port vs transformers") == 1


def test_bad_tensor_parallel_arguments_are_refused_before_loading(tp_checkpoint, monkeypatch):
    from llama_port.distributed import valid_tp_sizes

    folder, _ = tp_checkpoint
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"tp_plan='colwise'; expected one of \['auto'\]"):
        llama_port.LlamaForCausalLM.from_pretrained(folder, tp_plan="colwise")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N"):
        llama_port.LlamaForCausalLM.from_pretrained(folder, tp_plan="auto")
    with pytest.raises(ValueError, match="pass neither device= nor device_map="):
        llama_port.LlamaForCausalLM.from_pretrained(folder, tp_plan="auto", device="cpu")
    assert valid_tp_sizes(llama_port.LlamaConfig.from_dict(TP_CONFIG)) == [1, 2]
