"""Hostile or broken GGUF and Meta checkpoints: each is refused with a CheckpointError naming the
file and the field, in one line, before anything is allocated from it (issue 13)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_port import LlamaForCausalLM
from llama_port.checkpoints.errors import CorruptCheckpointError, UnsupportedCheckpointError
from llama_port.checkpoints.gguf import read_gguf_checkpoint
from llama_port.checkpoints.meta import read_meta_checkpoint

gguf = pytest.importorskip("gguf")

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 128, 4, 2, 2, 4096


def one_line_error(error_type, match: str, read, path: Path) -> str:
    """The message ``read(path)`` raises as ``error_type``: one line, naming the file, matching ``match``."""
    with pytest.raises(error_type, match=match) as info:
        read(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------- GGUF
def llama_gguf_metadata() -> dict:
    head_dim = HIDDEN // HEADS
    return {
        "llama.context_length": 64, "llama.embedding_length": HIDDEN, "llama.block_count": LAYERS,
        "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": head_dim,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"<t{i}>" for i in range(VOCAB)],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }  # fmt: skip


def write_llama_gguf(path: Path, **metadata) -> Path:
    """A real llama GGUF of ~2.5 MB (random F32 weights, embeddings first), written by gguf's
    GGUFWriter; ``metadata`` replaces or adds keys (``llama_x=...`` for ``llama.x``, dots as ``__``)."""
    keys = llama_gguf_metadata() | {name.replace("__", "."): value for name, value in metadata.items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in keys.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    kv_rows = KV_HEADS * HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (kv_rows, HIDDEN), f"blk.{i}.attn_v.weight": (kv_rows, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }  # fmt: skip
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> bytes:
    """The bytes of a good tiny llama GGUF, for tests to damage."""
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf").read_bytes()


def damaged(tmp_path: Path, data: bytes | bytearray) -> Path:
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(data))
    return path


def with_header_counts(data: bytes, tensor_count: int | None = None, kv_count: int | None = None) -> bytearray:
    """GGUF's header: magic, version (u32), tensor_count (u64) at byte 8, kv_count (u64) at byte 16."""
    out = bytearray(data)
    tensors, kvs = struct.unpack_from("<QQ", out, 8)
    new_counts = (tensors if tensor_count is None else tensor_count, kvs if kv_count is None else kv_count)
    struct.pack_into("<QQ", out, 8, *new_counts)
    return out


def test_the_good_gguf_reads(tmp_path, good_gguf):
    config = read_gguf_checkpoint(damaged(tmp_path, good_gguf)).config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (
        VOCAB, HIDDEN, LAYERS, KV_HEADS
    )
    assert len(good_gguf) > 2_000_000


@pytest.mark.parametrize(
    "size, match",
    [
        (3, r"not a GGUF file"),
        (20, r"kv_count at byte 16 needs 8 bytes, past the end of the file \(20 bytes\): truncated"),
        (1000, r"metadata 'tokenizer\.ggml\.tokens' at byte \d+ needs \d+ bytes, past the end of the file \(1000 "),
        (1_700_000, r"tensor 'output\.weight' needs bytes \d+\.\.\d+, past the end of the file \(1700000 bytes\)"),
    ],
    ids=["3B", "20B", "1000B", "1.7MB"],
)
def test_truncated_gguf(tmp_path, good_gguf, size, match):
    one_line_error(CorruptCheckpointError, match, read_gguf_checkpoint, damaged(tmp_path, good_gguf[:size]))


@pytest.mark.parametrize(
    "counts, match",
    [
        (dict(tensor_count=2**40), r"header tensor_count is 1099511627776; at most 65536 are read"),
        (dict(kv_count=2**63), r"header kv_count is 9223372036854775808; at most 65536 are read"),
        (dict(tensor_count=22), r"tensor '' has 0 dimensions; ggml tensors have 1 to 4"),
        (dict(tensor_count=20), r"\d+ bytes follow the last tensor the header describes: a count in the header"),
        (dict(tensor_count=0), r"\d+ bytes follow the last tensor the header describes"),
        (dict(kv_count=13), r"tensor 'tokenizer\.ggml\.eos_token_id' has 5 dimensions"),  # a key read as a tensor
        (dict(kv_count=15), r"the name of tensor #0 at byte \d+ needs \d+ bytes, past the end of the file"),
    ],
    ids=["tensors-2**40", "kvs-2**63", "tensors+1", "tensors-1", "tensors-0", "kvs-1", "kvs+1"],
)
def test_gguf_header_counts_that_lie(tmp_path, good_gguf, counts, match):
    tensors, kvs = struct.unpack_from("<QQ", good_gguf, 8)
    assert (tensors, kvs) == (21, 14)  # 3 + 9 per layer tensors; our 13 keys and general.architecture
    path = damaged(tmp_path, with_header_counts(good_gguf, **counts))
    one_line_error(CorruptCheckpointError, match, read_gguf_checkpoint, path)


def test_gguf_array_length_that_lies_is_refused_not_looped_over(tmp_path, good_gguf):
    """gguf-py's reader would loop 2**40 times, keeping a numpy view per item, on this file."""
    data = bytearray(good_gguf)
    key = b"tokenizer.ggml.tokens"
    length_at = data.index(key) + len(key) + 4 + 4  # key, value type ARRAY (u32), item type (u32)
    assert struct.unpack_from("<Q", data, length_at) == (VOCAB,)
    struct.pack_into("<Q", data, length_at, 2**40)
    match = r"metadata 'tokenizer\.ggml\.tokens' has 1099511627776 items; a GGUF's arrays may hold 1048576 in all"
    one_line_error(CorruptCheckpointError, match, read_gguf_checkpoint, damaged(tmp_path, data))


def test_gguf_with_a_duplicated_metadata_key(tmp_path):
    path = write_llama_gguf(tmp_path / "dup.gguf", general__dup_a=1, general__dup_b=2)
    data = path.read_bytes().replace(b"general.dup_b", b"general.dup_a")
    one_line_error(CorruptCheckpointError, r"metadata key 'general\.dup_a' appears twice", read_gguf_checkpoint,
                   damaged(tmp_path, data))  # fmt: skip


@pytest.mark.parametrize(
    "metadata, match",
    [
        (dict(llama__attention__head_count=0), r"llama\.attention\.head_count=0; expected a positive integer"),
        (dict(llama__attention__head_count=[4, 0]), r"head_count=\[4, 0\]; expected .* or a non-empty list of them"),
        (dict(llama__block_count="three"), r"llama\.block_count='three'; expected a positive integer <= 4096"),
        (dict(llama__embedding_length=True), r"llama\.embedding_length=True; expected a positive integer"),
        (dict(llama__rope__freq_base=float("nan")), r"llama\.rope\.freq_base=nan; expected a finite positive number"),
        (dict(llama__attention__layer_norm_rms_epsilon=float("inf")), r"layer_norm_rms_epsilon=inf; expected a finite"),
        (dict(llama__context_length=-5), r"llama\.context_length=-5; expected a positive integer"),
        (dict(llama__rope__scaling__type="yarn"), r"LlamaConfig\.rope_parameters: rope_type 'yarn' needs .*'factor'"),
        (dict(tokenizer__ggml__bos_token_id=VOCAB), rf"LlamaConfig\.bos_token_id={VOCAB}; expected null or an int"),
        (dict(split__count="2"), r"split\.count='2'; expected an integer in \[0, 65536\]"),
    ],
    ids=["heads-0", "heads-list-with-0", "block_count-str", "bool", "freq_base-nan", "eps-inf", "context-negative",
         "yarn-without-factor", "bos-outside-vocab", "split-count-str"],  # fmt: skip
)
def test_gguf_metadata_of_the_wrong_type_or_range(tmp_path, metadata, match):
    path = write_llama_gguf(tmp_path / "bad.gguf", **metadata)
    one_line_error(CorruptCheckpointError, match, read_gguf_checkpoint, path)
    # The same error, the same single line, through the public loader.
    one_line_error(CorruptCheckpointError, match, LlamaForCausalLM.from_pretrained, path)


def test_gguf_with_an_unknown_ggml_type(tmp_path, good_gguf):
    data = bytearray(good_gguf)
    name = b"output_norm.weight"
    type_at = data.index(name) + len(name) + 4 + 8  # name, n_dims (u32), one dim (u64)
    struct.pack_into("<I", data, type_at, 999)
    one_line_error(UnsupportedCheckpointError, r"tensor 'output_norm\.weight' has ggml type 999", read_gguf_checkpoint,
                   damaged(tmp_path, data))  # fmt: skip


# ------------------------------------------------------------------------------------------- Meta
META_PARAMS = dict(dim=HIDDEN, n_layers=1, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=-1, multiple_of=16,
                   norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip


def write_meta_folder(folder: Path, params: dict | str, with_weights: bool = False) -> Path:
    """params.json (a dict, or raw text) and, with_weights, a consolidated.00.pth of zeros whose
    shapes fit META_PARAMS (vocabulary 128)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    if with_weights:
        ffn, kv_rows = 176, KV_HEADS * HIDDEN // HEADS  # 16 * ceil(int(2 * 4 * 64 / 3) / 16)
        shapes = {"tok_embeddings.weight": (128, HIDDEN), "norm.weight": (HIDDEN,), "output.weight": (128, HIDDEN),
                  "layers.0.attention.wq.weight": (HIDDEN, HIDDEN), "layers.0.attention.wk.weight": (kv_rows, HIDDEN),
                  "layers.0.attention.wv.weight": (kv_rows, HIDDEN), "layers.0.attention.wo.weight": (HIDDEN, HIDDEN),
                  "layers.0.feed_forward.w1.weight": (ffn, HIDDEN), "layers.0.feed_forward.w2.weight": (HIDDEN, ffn),
                  "layers.0.feed_forward.w3.weight": (ffn, HIDDEN), "layers.0.attention_norm.weight": (HIDDEN,),
                  "layers.0.ffn_norm.weight": (HIDDEN,)}  # fmt: skip
        torch.save({name: torch.zeros(shape) for name, shape in shapes.items()}, folder / "consolidated.00.pth")
    return folder


def test_the_good_meta_checkpoint_reads(tmp_path):
    config = read_meta_checkpoint(write_meta_folder(tmp_path / "meta", META_PARAMS, with_weights=True)).config
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (HIDDEN, 176, 128)


def test_item_6_string_multiplier_and_huge_dim_are_refused_before_any_arithmetic(tmp_path):
    """175 bytes that used to allocate gigabytes ("1.3" * int(...)) before any shape check."""
    params = dict(META_PARAMS, dim=3e9, ffn_dim_multiplier="1.3")
    folder = write_meta_folder(tmp_path / "bomb", params, with_weights=True)
    one_line_error(CorruptCheckpointError, r"params\.json: dim=3000000000\.0; expected a positive integer <= 262144",
                   read_meta_checkpoint, folder)  # fmt: skip
    write_meta_folder(folder, dict(META_PARAMS, ffn_dim_multiplier="1.3"))
    one_line_error(CorruptCheckpointError, r"params\.json: ffn_dim_multiplier='1\.3'; expected null or a finite number",
                   read_meta_checkpoint, folder)  # fmt: skip
    write_meta_folder(folder, dict(META_PARAMS, dim=3_000_000_000))
    one_line_error(CorruptCheckpointError, r"params\.json: dim=3000000000; expected a positive integer <= 262144",
                   read_meta_checkpoint, folder)  # fmt: skip


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(META_PARAMS, norm_eps=None), r"norm_eps=None; expected a finite positive number"),
        (dict(META_PARAMS, multiple_of=0), r"multiple_of=0; expected a positive integer"),
        (dict(META_PARAMS, dim="abc"), r"dim='abc'; expected a positive integer"),
        (dict(META_PARAMS, n_heads=True), r"n_heads=True; expected a positive integer"),
        (dict(META_PARAMS, rope_theta=float("nan")), r"rope_theta=nan; expected a finite positive number above 1"),
        (dict(META_PARAMS, use_scaled_rope="yes"), r"use_scaled_rope='yes'; expected a bool"),
        (dict(META_PARAMS, vocab_size=[128]), r"vocab_size=\[128\]; expected an integer in \[-1, 16777216\]"),
        (dict(META_PARAMS, n_heads=3), r"params\.json: LlamaConfig\.hidden_size=64 is not divisible by num_attention"),
        ({k: v for k, v in META_PARAMS.items() if k != "norm_eps"}, r"missing \['norm_eps'\]"),
    ],
    ids=["norm_eps-null", "multiple_of-0", "dim-str", "n_heads-bool", "theta-nan", "scaled-str", "vocab-list",
         "heads-do-not-divide", "norm_eps-missing"],  # fmt: skip
)
def test_meta_params_of_the_wrong_type_or_range(tmp_path, params, match):
    folder = write_meta_folder(tmp_path / "meta", params, with_weights=True)
    one_line_error(CorruptCheckpointError, match, read_meta_checkpoint, folder)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 200_000 + "]" * 200_000, r"params\.json: JSON nested too deeply to parse"),
        ('{"dim": ' + "1" * 5000 + "}", r"params\.json: not valid JSON \(Exceeds the limit"),
        ("[1, 2]", r"params\.json: expected a JSON object, got list"),
    ],
    ids=["200k-deep", "5000-digit-int", "list"],
)
def test_meta_params_json_that_json_cannot_hold(tmp_path, text, match):
    one_line_error(CorruptCheckpointError, match, read_meta_checkpoint, write_meta_folder(tmp_path / "m", text))


def test_oversized_params_json_is_refused_by_its_size(tmp_path):
    folder = write_meta_folder(tmp_path / "big", META_PARAMS)
    with open(folder / "params.json", "r+b") as f:
        f.truncate(17 * 2**20)  # sparse: nothing is written, and nothing must be read
    one_line_error(CorruptCheckpointError, r"params\.json: over the 16 MiB limit for a config file",
                   read_meta_checkpoint, folder)  # fmt: skip


def test_meta_token_ids_from_a_bad_sibling_config_name_that_file(tmp_path):
    repo = tmp_path / "repo"
    write_meta_folder(repo / "original", META_PARAMS, with_weights=True)
    (repo / "config.json").write_text(json.dumps({"bos_token_id": "1", "eos_token_id": [2, 500]}))
    message = one_line_error(CorruptCheckpointError, r"config\.json: bos_token_id='1'; expected null or an integer in "
                             r"\[0, vocab_size=128\)", read_meta_checkpoint, repo)  # fmt: skip
    assert "params.json" not in message
