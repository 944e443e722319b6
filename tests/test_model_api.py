"""The model surface Hugging Face clients use, checked against transformers' model on the same inputs:
ModelOutput semantics (attribute, key and integer access, None fields skipped), forward's client
arguments (return_dict, token_type_ids, num_items_in_batch, config defaults), the model methods
(submodules, resize_token_embeddings draw for draw, input grads, gradient checkpointing kwargs,
memory footprint, push_to_hub), from_pretrained's transformers arguments, the config's
compatibility attributes, and torch.export / torch.compile(fullgraph=True) of the forward."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from conftest import (
    ATOL,
    IDS,
    make_tiny_pair,
    max_diff,
    report_max_diff,
    tiny_config_dict,
    write_gguf,
)
from test_checkpoints_resolve import unreachable_hub  # noqa: F401 - the shared no-network fixture

from llama_port import (
    CausalLMOutput,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    LlamaModelOutput,
    modeling,
)
from llama_port.checkpoints.errors import ShapeMismatchError

MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # left padding in row 1


@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair("eager")


# transformers 5.24 renamed the cache field past_key_values (5.23, and ours) to cache.
TRANSFORMERS_KEY = {"cache": "past_key_values"}


def _same_structure(ours, theirs) -> None:
    """Same keys in the same order, the same tuple length; the tensors equal up to fp32 noise."""
    assert list(ours.keys()) == [TRANSFORMERS_KEY.get(key, key) for key in theirs.keys()]
    assert len(ours.to_tuple()) == len(theirs.to_tuple()) == len(ours)
    for key, theirs_key in zip(ours.keys(), theirs.keys()):
        if isinstance(ours[key], torch.Tensor):
            torch.testing.assert_close(ours[key], theirs[theirs_key], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- outputs
def test_output_classes_are_importable_from_both_modules():
    assert modeling.CausalLMOutput is CausalLMOutput and modeling.LlamaModelOutput is LlamaModelOutput


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(use_cache=False),
        dict(use_cache=True),
        dict(labels=IDS, use_cache=False),
        dict(labels=IDS, output_hidden_states=True, output_attentions=True, use_cache=False),
    ],
    ids=["logits", "cache", "loss", "everything"],
)
def test_output_keys_and_tuple_match_transformers(pair, kwargs):
    ours, hf = pair
    with torch.no_grad():
        out, ref = ours(IDS, attention_mask=MASK, **kwargs), hf(IDS, attention_mask=MASK, **kwargs)
    _same_structure(out, ref)
    first = "loss" if "labels" in kwargs else "logits"
    assert out[0] is out[first] is getattr(out, first)
    assert [k for k, _ in out.items()] == list(out.keys()) and len(list(out.values())) == len(out)
    if "output_hidden_states" in kwargs:
        assert len(out.hidden_states) == len(ref.hidden_states) and len(out.attentions) == len(ref.attentions)


def test_return_dict_false_returns_the_tuple(pair):
    ours, hf = pair
    with torch.no_grad():
        out = ours(IDS, labels=IDS, use_cache=False, return_dict=False)
        ref = hf(IDS, labels=IDS, use_cache=False, return_dict=False)
        base = ours.model(IDS, use_cache=False, return_dict=False)
    assert type(out) is tuple and len(out) == len(ref) == 2
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=0)
    assert type(base) is tuple and len(base) == 1


def test_output_none_fields_are_skipped_and_setting_one_adds_it():
    out = CausalLMOutput(logits=torch.ones(1))
    assert list(out.keys()) == ["logits"] and out.loss is None
    with pytest.raises(KeyError):
        out["loss"]
    out.loss = torch.zeros(())
    assert list(out.keys()) == ["logits", "loss"] and out["loss"] is out.loss  # insertion order, as transformers
    out["hidden_states"] = (torch.ones(1),)
    assert out.hidden_states is out["hidden_states"]
    for refused in (lambda: out.pop("loss"), lambda: out.update(loss=None), lambda: out.__delitem__("loss")):
        with pytest.raises(TypeError):
            refused()


def test_output_built_from_one_mapping_as_transformers_and_accelerate_do():
    """accelerate's device hooks rebuild an output as type(out)(dict_of_moved_fields)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    logits, loss = torch.ones(2, 3), torch.zeros(())
    ours, theirs = CausalLMOutput({"logits": logits, "loss": loss}), CausalLMOutputWithPast({"logits": logits, "loss": loss})
    assert list(ours.keys()) == list(theirs.keys()) and ours.logits is logits and ours.loss is loss
    assert ours.to_tuple() == theirs.to_tuple()
    with pytest.raises(TypeError, match=r"has no fields \['nope'\]"):
        CausalLMOutput({"nope": logits})


def test_output_pickles_and_flattens_as_a_pytree():
    out = CausalLMOutput(loss=torch.zeros(()), logits=torch.ones(2))
    again = pickle.loads(pickle.dumps(out))
    assert list(again.keys()) == ["loss", "logits"]
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 2 and list(torch.utils._pytree.tree_unflatten(leaves, spec).keys()) == ["loss", "logits"]


# ----------------------------------------------------------------------------- forward arguments
def test_token_type_ids_are_ignored(pair):
    ours, _ = pair
    with torch.no_grad():
        plain = ours(IDS, use_cache=False).logits
        typed = ours(IDS, token_type_ids=torch.ones_like(IDS), use_cache=False).logits
    assert torch.equal(plain, typed)


def test_output_flags_default_to_the_config(pair):
    ours, _ = pair
    ours.config._extra["output_hidden_states"] = True
    try:
        with torch.no_grad():
            out = ours(IDS, use_cache=False)
            off = ours(IDS, use_cache=False, output_hidden_states=False)
    finally:
        del ours.config._extra["output_hidden_states"]
    assert len(out.hidden_states) == ours.config.num_hidden_layers + 1 and off.hidden_states is None


@pytest.mark.parametrize("count", [7, torch.tensor(23)], ids=["int", "tensor"])
def test_loss_with_num_items_in_batch_matches_transformers(pair, count):
    ours, hf = pair
    labels = IDS.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        loss = ours(IDS, labels=labels, num_items_in_batch=count, use_cache=False).loss
        ref = hf(IDS, labels=labels, num_items_in_batch=count, use_cache=False).loss
        mean = ours(IDS, labels=labels, use_cache=False).loss
    diff = report_max_diff(f"loss with num_items_in_batch={int(count)}", (loss - ref).abs().item())
    assert diff <= 1e-6
    labelled = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, mean * labelled / int(count), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------- model methods
def test_class_attributes_and_submodules(pair):
    ours, _ = pair
    assert ours.can_generate() and not LlamaModel.can_generate()
    assert ours.main_input_name == "input_ids"
    assert ours.base_model is ours.get_decoder() is ours.model and ours.model.base_model is ours.model
    assert ours.get_input_embeddings() is ours.model.embed_tokens and ours.get_output_embeddings() is ours.lm_head
    assert ours.model.get_output_embeddings() is None and ours.name_or_path == ""
    with pytest.raises(ValueError, match="set_decoder"):
        ours.model.set_decoder(ours.model)


def test_prepare_inputs_for_generation_drives_a_decode_loop_as_transformers(pair):
    """transformers 5's decode loop, written out as it calls the method (what PEFT's generate goes
    through): a prefill (is_first_iteration, the whole prompt) then steps of one token
    (next_sequence_length=1), position_ids from the attention mask, a DynamicCache, greedy. The
    same inputs and the same tokens as transformers' model, the same logits within fp32 noise."""
    from transformers import DynamicCache as HFDynamicCache

    from llama_port import DynamicCache

    ours, theirs = pair
    runs = {}
    for name, model, cache in (("ours", ours, DynamicCache()), ("theirs", theirs, HFDynamicCache())):
        ids, mask, seen = IDS.clone(), MASK.clone(), []
        with torch.no_grad():
            for step in range(4):
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' loop
                inputs = model.prepare_inputs_for_generation(
                    ids, next_sequence_length=None if step == 0 else 1, past_key_values=cache, attention_mask=mask,
                    is_first_iteration=step == 0, position_ids=positions, use_cache=True,
                )
                seen.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
                logits = model(**inputs).logits[:, -1]  # (B, V)
                seen[-1]["logits"] = logits
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        runs[name] = (ids, seen)
    assert torch.equal(runs["ours"][0], runs["theirs"][0])
    worst = 0.0
    for a, b in zip(runs["ours"][1], runs["theirs"][1], strict=True):
        assert a.keys() == b.keys()
        for key in ("input_ids", "attention_mask", "position_ids"):
            assert torch.equal(a[key], b[key]), key
        worst = max(worst, (a["logits"] - b["logits"]).abs().max().item())
    assert report_max_diff("prepare_inputs_for_generation loop vs transformers", worst) <= 1e-5


def test_setters_replace_the_modules():
    ours, _ = make_tiny_pair("eager")
    decoder, embedding, head = ours.model, torch.nn.Embedding(128, 64), torch.nn.Linear(64, 128, bias=False)
    ours.set_input_embeddings(embedding)
    ours.set_output_embeddings(head)
    assert ours.model.embed_tokens is embedding and ours.lm_head is head
    ours.set_decoder(decoder)
    assert ours.model is decoder


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("mean_resizing", [True, False], ids=["mean", "init"])
def test_resize_token_embeddings_matches_transformers_draw_for_draw(tied, mean_resizing):
    """Same shapes, the old rows kept, config.vocab_size updated, the tie kept, and, with the same
    seed, the same new rows: our draws from torch's RNG are transformers' draws, in its order."""
    ours, hf = make_tiny_pair("eager", tie_word_embeddings=tied)
    old = ours.model.embed_tokens.weight.detach().clone()
    torch.manual_seed(5)
    returned = ours.resize_token_embeddings(133, pad_to_multiple_of=8, mean_resizing=mean_resizing)
    torch.manual_seed(5)
    hf.resize_token_embeddings(133, pad_to_multiple_of=8, mean_resizing=mean_resizing)
    assert returned is ours.model.embed_tokens and ours.config.vocab_size == hf.config.vocab_size == 136
    assert returned.num_embeddings == ours.lm_head.out_features == 136
    assert torch.equal(returned.weight[:128], old)
    assert (ours.lm_head.weight is returned.weight) == tied
    for name, tensor in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=0)


def test_resize_token_embeddings_shrinks_and_refuses_bad_sizes():
    ours, _ = make_tiny_pair("eager")
    old_head = ours.lm_head.weight.detach().clone()
    ours.resize_token_embeddings(100)
    assert ours.lm_head.weight.shape == (100, 64) and torch.equal(ours.lm_head.weight, old_head[:100])
    assert ours.resize_token_embeddings() is ours.model.embed_tokens and ours.config.vocab_size == 100
    with pytest.raises(ValueError, match="pad_to_multiple_of=0; expected a positive int"):
        ours.resize_token_embeddings(100, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="new_num_tokens=-1; expected a positive int"):
        ours.resize_token_embeddings(-1)


def test_input_require_grads_and_gradient_checkpointing_kwargs(pair):
    ours, _ = make_tiny_pair("eager")
    ours.requires_grad_(False)
    ours.enable_input_require_grads()
    assert ours.get_input_embeddings()(IDS).requires_grad
    ours.disable_input_require_grads()
    assert not ours.get_input_embeddings()(IDS).requires_grad

    ours.requires_grad_(True)
    ours.train()
    reference = ours(IDS, labels=IDS).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in ours.named_parameters()}
    for use_reentrant in (True, False):
        ours.zero_grad()
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        assert ours.model.gradient_checkpointing_kwargs == {"use_reentrant": use_reentrant}
        loss = ours(IDS, labels=IDS).loss
        loss.backward()
        assert torch.equal(loss, reference)
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5)
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


def test_memory_footprint_matches_transformers(pair):
    ours, hf = pair
    assert ours.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)
    buffers = sum(b.nelement() * b.element_size() for b in ours.buffers())
    assert ours.get_memory_footprint() == ours.get_memory_footprint(return_buffers=False) + buffers


def test_push_to_hub_offline_is_one_clear_line(pair, unreachable_hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    ours, _ = pair
    with pytest.raises(ConnectionError, match=r"^push_to_hub\('org/tiny'\): the Hub is unreachable, nothing was "
                       r"uploaded \([^\n]*\)$"):
        ours.push_to_hub("org/tiny", token="hf_not_a_real_token")


def test_push_to_hub_uploads_what_save_pretrained_writes(pair, monkeypatch):
    import huggingface_hub

    uploads = []

    def upload_folder(self, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs))
        return "https://huggingface.co/org/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: repo_id)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    ours, _ = pair
    assert ours.push_to_hub("org/tiny", commit_message="m") == "https://huggingface.co/org/tiny/commit/abc"
    (repo_id, files, kwargs), = uploads
    assert repo_id == "org/tiny" and files == ["config.json", "generation_config.json", "model.safetensors"] and kwargs["commit_message"] == "m"


# ------------------------------------------------------------------------- from_pretrained, config
def test_model_accepts_a_transformers_config(pair):
    _, hf = pair
    built = LlamaForCausalLM(hf.config, attn_implementation="eager")
    assert isinstance(built.config, LlamaConfig) and built.config.to_dict()["vocab_size"] == hf.config.vocab_size
    with pytest.raises(TypeError, match="config must be a llama_port.LlamaConfig or a transformers LlamaConfig"):
        LlamaForCausalLM({"vocab_size": 128})


def test_from_pretrained_accepts_transformers_arguments(layouts, hf_model):
    folder = layouts["single"]
    ours = LlamaForCausalLM.from_pretrained(
        folder, attn_implementation="eager", low_cpu_mem_usage=True, trust_remote_code=True, config=hf_model.config
    )
    assert max_diff("from_pretrained(config=transformers')", ours, hf_model) <= ATOL
    assert ours.name_or_path == ours.config.name_or_path == str(folder)
    assert ours.config.to_dict()["_name_or_path"] == str(folder)
    with pytest.raises(ValueError, match=r"^quantization_config=dict: llama_port does not quantize"):
        LlamaForCausalLM.from_pretrained(folder, quantization_config={"load_in_4bit": True})


def test_from_pretrained_config_must_fit_the_weights(layouts):
    smaller = LlamaConfig.from_dict(tiny_config_dict(hidden_size=32))
    with pytest.raises(ShapeMismatchError):
        LlamaForCausalLM.from_pretrained(layouts["single"], config=smaller)


def test_gguf_file_names_a_file_in_a_folder(tmp_path, hf_model):
    write_gguf(tmp_path / "tiny-f32.gguf", hf_model)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny-f32.gguf", attn_implementation="eager")
    assert max_diff("gguf_file=", ours, hf_model) <= ATOL
    with pytest.raises(ValueError, match=r"gguf_file='tiny-f32.gguf' names a file in a local folder, but 'org/x'"):
        LlamaForCausalLM.from_pretrained("org/x", gguf_file="tiny-f32.gguf")


def test_config_answers_transformers_compatibility_attributes(pair):
    ours, hf = pair
    preset = LlamaConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=1, dtype="bfloat16")
    for config in (ours.config, preset):
        assert config.is_encoder_decoder is False and config.use_return_dict is True
        assert config.output_hidden_states is False and config.output_attentions is False
        assert config.get_text_config() is config
    assert preset.architectures == ["LlamaForCausalLM"] and ours.config.architectures == hf.config.architectures
    assert ours.config.rope_scaling == hf.config.rope_parameters and preset.torch_dtype is torch.bfloat16
    assert preset.name_or_path == "" and LlamaConfig().torch_dtype is None


# ------------------------------------------------------------------------ torch.export / compile
@pytest.fixture(scope="module")
def traced_pairs():
    """{backend: our tiny model} for the two backends that trace (the varlen ones unpad by value)."""
    return {name: make_tiny_pair(name)[0] for name in ("sdpa", "eager")}


TRACED_MASKS = {"padded": MASK, "all_ones": torch.ones_like(IDS), "no_mask": None}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("mask", list(TRACED_MASKS))
def test_export_and_dynamo_trace_the_forward_with_no_graph_break(traced_pairs, backend, mask):
    """torch.export gives eager's logits (all_ones: eager takes SDPA's causal shortcut, the traced
    forward the full mask); dynamo sees one graph. use_cache=False: a returned cache is no pytree,
    in transformers' export as in ours."""
    model = traced_pairs[backend]
    kwargs = {"use_cache": False, **({"attention_mask": TRACED_MASKS[mask]} if mask != "no_mask" else {})}
    with torch.no_grad():
        expected = model(IDS, **kwargs).logits
        exported = torch.export.export(model, (IDS,), kwargs=kwargs).module()(IDS, **kwargs)
    diff = report_max_diff(f"torch.export {backend} {mask}", (exported.logits - expected).abs().max().item())
    assert diff <= 1e-5 and list(exported.keys()) == ["logits"]
    explanation = torch._dynamo.explain(model)(IDS, **kwargs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.parametrize("backend, mask", [("sdpa", "padded"), ("eager", "no_mask")])
def test_compile_fullgraph_gives_eager_logits(traced_pairs, backend, mask):
    """Two inductor graphs in all (CPU compiles are slow); fullgraph=True fails on any graph break."""
    model = traced_pairs[backend]
    kwargs = {"use_cache": False, **({"attention_mask": TRACED_MASKS[mask]} if mask != "no_mask" else {})}
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(IDS, **kwargs).logits
        logits = compiled(IDS, **kwargs).logits
    diff = report_max_diff(f"torch.compile(fullgraph=True) {backend} {mask}", (logits - expected).abs().max().item())
    assert diff <= 1e-5


def test_compiled_one_token_step_attends_on_packed_gqa_queries(traced_pairs):
    """Under torch.compile a one-token sdpa step packs its query heads, (B, H, 1, D) ->
    (B, Hkv, n_rep, D), against keys and values as cached, (B, Hkv, S, D): no repeat_kv copies in
    the compiled decode step (generation speed, README). Its logits are eager's, where the mask
    (left padding) rules out SDPA's native GQA."""
    model = traced_pairs["sdpa"]
    config = model.config
    sdpa_shapes = []

    def recording_backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.target is torch.nn.functional.scaled_dot_product_attention:
                sdpa_shapes.append([tuple(arg.meta["example_value"].shape) for arg in node.args[:3]])
        return graph_module.forward

    with torch.no_grad():
        prefix = model(IDS[:, :-1], attention_mask=MASK[:, :-1], use_cache=True).past_key_values
        expected = model(IDS[:, -1:], attention_mask=MASK, past_key_values=copy.deepcopy(prefix), use_cache=True).logits
        step = torch.compile(model, backend=recording_backend, fullgraph=True)
        logits = step(IDS[:, -1:], attention_mask=MASK, past_key_values=prefix, use_cache=True).logits
    batch, length = IDS.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    assert kv_heads < heads
    packed = [(batch, kv_heads, heads // kv_heads, head_dim), (batch, kv_heads, length, head_dim), (batch, kv_heads, length, head_dim)]
    assert sdpa_shapes == [packed] * config.num_hidden_layers
    diff = report_max_diff("compiled one-token step (packed GQA) vs eager", (logits - expected).abs().max().item())
    assert diff <= 1e-6


def test_flash_reference_traced_branch_is_exact_for_an_all_real_mask(monkeypatch):
    """The varlen backends' traced branch (unpad whatever the key mask holds) on an all-real mask
    gives what eager's dense shortcut gives. (They are not traceable end to end: unpadding has
    data-dependent shapes.)"""
    model, _ = make_tiny_pair("eager")
    model.set_attn_implementation("flash_reference")
    ones = torch.ones_like(IDS)
    with torch.no_grad():
        dense = model(IDS, attention_mask=ones, use_cache=False).logits
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        unpadded = model(IDS, attention_mask=ones, use_cache=False).logits
    assert report_max_diff("flash_reference unpadded vs dense", (unpadded - dense).abs().max().item()) <= 1e-5
