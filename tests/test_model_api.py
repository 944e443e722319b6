"""The model surface Hugging Face clients use, checked against transformers' model on the same inputs:
ModelOutput semantics (attribute, key and integer access, None fields skipped), forward's client
arguments (return_dict, token_type_ids, num_items_in_batch, config defaults)."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import IDS, make_tiny_pair, report_max_diff

from llama_port import CausalLMOutput, LlamaModelOutput, modeling

MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # left padding in row 1


@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair("eager")


def _same_structure(ours, theirs) -> None:
    """Same keys in the same order, the same tuple length; the tensors equal up to fp32 noise."""
    assert list(ours.keys()) == list(theirs.keys())
    assert len(ours.to_tuple()) == len(theirs.to_tuple()) == len(ours)
    for key in ours:
        if isinstance(ours[key], torch.Tensor):
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)


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
