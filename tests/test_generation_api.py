"""generate()'s transformers arguments against transformers' generate on the same tiny model
(greedy: the same tokens; sampling: the same tokens from the same global seed), the logits
processors against transformers' own, GenerationConfig (precedence, generation_config.json read
and written), GenerateOutput, stop strings, and the arguments generate() refuses."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_pair, write_tiny_tokenizer

import llama_port
from llama_port.generation import (
    GenerateOutput,
    GenerationConfig,
    MinLength,
    RepetitionPenalty,
    StopStrings,
    min_p_filter,
    next_tokens_from_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 12


@pytest.fixture(scope="module")
def pair():
    """(transformers model, our model) sharing random tiny weights, sdpa."""
    ours, hf = make_tiny_pair("sdpa", max_position_embeddings=128)
    return hf, ours


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny word-level tokenizer (ids 3.. are "w3".. ) for stop strings."""
    import transformers

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def batch(lengths=(9, 5, 2), seed=0):
    """Random prompts, left-padded with 0: (ids, attention_mask), each (B, T)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 128, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def both(pair, ids, mask, **kwargs):
    """(transformers' output, ours) for the same prompt and arguments."""
    hf, ours = pair
    return hf.generate(ids, attention_mask=mask, **kwargs), ours.generate(ids, attention_mask=mask, **kwargs)


def free_tokens(pair, ids, mask, steps=NEW):
    """Our greedy continuation with no eos (B, steps)."""
    return pair[1].generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=[])[:, ids.shape[1] :]


# ------------------------------------------------------------------------- greedy, each argument
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=NEW),
        dict(max_length=15),  # total length: 15 - 9 = 6 new tokens
        dict(max_length=40, max_new_tokens=5),  # max_new_tokens wins
        dict(),  # neither: transformers' default of 20 new tokens
        dict(max_new_tokens=NEW, repetition_penalty=1.5),
        dict(max_new_tokens=NEW, repetition_penalty=0.6),
        dict(max_new_tokens=NEW, eos_token_id=[], use_cache=True, do_sample=False),
        dict(max_new_tokens=NEW, temperature=0.5, top_k=3, top_p=0.5, min_p=0.3),  # warpers unused when greedy
    ],
    ids=["max_new_tokens", "max_length", "both_lengths", "default_length", "penalty", "penalty_below_1",
         "no_eos", "greedy_ignores_warpers"],
)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_arguments_match_transformers(pair, kwargs, cache):
    ids, mask = batch()
    expected, got = both(pair, ids, mask, cache_implementation=None if cache == "dynamic" else cache, **kwargs)
    if cache == "dynamic":  # transformers' None: its default, the dynamic cache
        got = pair[1].generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected)


def test_min_new_tokens_and_min_length_hold_back_eos(pair):
    ids, mask = batch()
    free = free_tokens(pair, ids, mask)
    eos = int(free[0, 1])  # row 0 would end at its second token
    plain_hf, plain = both(pair, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(plain, plain_hf)
    for kwargs in (dict(min_new_tokens=6), dict(min_length=ids.shape[1] + 6), dict(min_length=3, min_new_tokens=6)):
        expected, got = both(pair, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, **kwargs)
        assert torch.equal(got, expected), kwargs
        assert (got[:, ids.shape[1] : ids.shape[1] + 6] != eos).all()  # no eos among the first 6
        assert not torch.equal(got, plain)


def test_eos_list_and_pad_token_id(pair):
    ids, mask = batch()
    free = free_tokens(pair, ids, mask)
    eos = [int(free[0, 2]), int(free[1, 5])]
    expected, got = both(pair, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(got, expected)
    assert (got == 7).any()  # finished rows padded with the given id


def test_custom_processor_and_criterion_run_where_transformers_runs_them(pair):
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    ids, mask = batch()
    banned = int(free_tokens(pair, ids, mask)[0, 0])
    seen = []

    class Ban(LogitsProcessor):  # sees the scores after the repetition penalty
        def __call__(self, input_ids, scores):
            seen.append(scores.clone())
            return scores.index_fill(1, torch.tensor([banned]), float("-inf"))

    class EndsOnOdd(StoppingCriteria):  # a row ends at its first odd token past the 4th new one
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, -1] % 2 == 1) & (input_ids.shape[1] >= ids.shape[1] + 4)

    kwargs = dict(max_new_tokens=NEW, repetition_penalty=1.3, eos_token_id=2, pad_token_id=0)
    expected = pair[0].generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([Ban()]),
                                stopping_criteria=StoppingCriteriaList([EndsOnOdd()]), **kwargs)
    hf_seen, seen[:] = list(seen), []
    # plain callables (duck-typed) work as transformers' classes do; a bool ends every row
    got = pair[1].generate(ids, attention_mask=mask, logits_processor=[Ban()], stopping_criteria=[EndsOnOdd()],
                           **kwargs)
    assert torch.equal(got, expected)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(seen, hf_seen)) and len(seen) == len(hf_seen)
    short = pair[1].generate(ids, attention_mask=mask, max_new_tokens=NEW, stopping_criteria=[lambda i, s: True])
    assert short.shape[1] == ids.shape[1] + 1


def test_scores_and_logits_match_transformers(pair):
    ids, mask = batch()
    kwargs = dict(max_new_tokens=6, repetition_penalty=1.4, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, eos_token_id=[])
    expected, got = both(pair, ids, mask, **kwargs)
    assert isinstance(got, GenerateOutput) and torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == len(got.logits) == 6
    for mine, theirs in [*zip(got.scores, expected.scores), *zip(got.logits, expected.logits)]:
        assert mine.shape == (3, 128) and mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    assert not torch.equal(got.scores[1], got.logits[1])  # processed vs raw
    # ModelOutput access: attribute, key, integer; None fields skipped
    plain = pair[1].generate(ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True)
    assert list(plain.keys()) == ["sequences"] and plain.scores is None and plain.logits is None
    assert torch.equal(plain["sequences"], plain[0]) and plain.to_tuple()[0] is plain.sequences
    assert "scores" not in plain and list(plain) == ["sequences"]
    with pytest.raises(KeyError):
        plain["scores"]


def test_processors_and_outputs_on_the_compiled_static_path(pair):
    """The processors run outside the compiled decode step; the logits kept per step are copies."""
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, repetition_penalty=1.3, eos_token_id=[],
                  return_dict_in_generate=True, output_logits=True)
    eager = pair[1].generate(ids, **kwargs)
    torch._dynamo.reset()
    compiled = pair[1].generate(ids, cache_implementation="static", compile=True, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    for mine, reference in zip(compiled.logits, eager.logits, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=0)


def test_streamer_sees_the_expanded_rows(pair):
    ids, mask = batch((4, 2))
    seen, ended = [], []
    streamer = SimpleNamespace(put=lambda value: seen.append(value.clone()), end=lambda: ended.append(True))
    out = pair[1].generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, num_return_sequences=2,
                           eos_token_id=[], seed=0, streamer=streamer)
    assert ended == [True] and torch.equal(seen[0], ids.repeat_interleave(2, dim=0))
    assert torch.equal(torch.stack(seen[1:], dim=1), out[:, ids.shape[1] :])


# ------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # transformers' default top_k=50
        dict(temperature=0.7, top_k=20, top_p=0.9),
        dict(min_p=0.1, top_k=0),
        dict(temperature=1.3, repetition_penalty=1.2, num_return_sequences=3),
    ],
    ids=["defaults", "temperature_top_k_top_p", "min_p", "num_return_sequences"],
)
def test_sampling_from_the_global_seed_matches_transformers(pair, kwargs):
    """transformers draws one torch.multinomial per step from the global RNG; so do we without seed=."""
    hf, ours = pair
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=True, eos_token_id=[], **kwargs)
    torch.manual_seed(1234)
    expected = hf.generate(ids, **kwargs)
    torch.manual_seed(1234)
    got = ours.generate(ids, **kwargs)
    assert got.shape[0] == ids.shape[0] * kwargs.get("num_return_sequences", 1)
    assert torch.equal(got, expected)


def test_num_return_sequences_repeats_each_prompt_side_by_side(pair):
    ids, mask = batch()
    out = pair[1].generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, num_return_sequences=2,
                           eos_token_id=[], seed=3)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))
    assert not torch.equal(out[0], out[1])  # two samples of the same prompt


# ------------------------------------------------------------------- processors vs transformers
def test_processors_match_transformers_processors():
    from transformers.generation.logits_process import (
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
    )

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40, generator=generator) * 3
    ids, mask = batch((6, 3, 1))
    ids = ids % 40
    pads = (mask != 0).int().argmax(dim=1)
    for penalty in (0.5, 1.3, 2.0):
        theirs = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)(ids, scores.clone())
        assert torch.equal(RepetitionPenalty(penalty, pads)(ids, scores.clone()), theirs)
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        assert torch.equal(RepetitionPenalty(penalty)(ids, scores.clone()), theirs)
    for min_length in (3, 6, 7):
        theirs = MinLengthLogitsProcessor(min_length, [2, 5])(ids, scores.clone())
        assert torch.equal(MinLength(min_length, [2, 5])(ids, scores.clone()), theirs)
        theirs = MinNewTokensLengthLogitsProcessor(2, min_length - 2, [2, 5])(ids, scores.clone())
        assert torch.equal(MinLength(min_length, [2, 5])(ids, scores.clone()), theirs)
    for min_p in (0.0, 0.05, 0.3, 1.0):
        assert torch.equal(min_p_filter(scores, min_p), MinPLogitsWarper(min_p)(ids, scores.clone()))


def test_warper_order_is_transformers(pair):
    """temperature -> top-k -> top-p -> min-p: min_p after temperature (llama.cpp's order, as transformers)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 2
    ids = torch.zeros(4, 1, dtype=torch.long)
    theirs = scores.clone()
    for warper in (TemperatureLogitsWarper(0.6), TopKLogitsWarper(30), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        theirs = warper(ids, theirs)
    kept = torch.isfinite(theirs)
    draws = torch.stack([
        next_tokens_from_logits(scores, True, 0.6, 30, 0.9, torch.Generator().manual_seed(s), min_p=0.05)
        for s in range(200)
    ])  # (200, B)
    assert kept.gather(1, draws.T).all()  # every draw inside transformers' kept set


# ------------------------------------------------------------------------------- stop strings
class PieceTokenizer:
    """Decodes ids by joining fixed text pieces (what a BPE tokenizer's decode does)."""

    pieces = ("", "st", "op", "opera", "las", "topper", "stop", "at", "x", "s", "t")

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize(
    "pieces, stops",
    [
        (["st", "op"], True), (["stop"], True), (["st", "opera"], True), (["las", "topper"], True),
        (["stop", "at"], False), (["st", "op", "at"], False), (["x"], False),
        (["x"] * 30 + ["s", "t", "op"], True),  # past the first tokens: only the last few are decoded
    ],
)
def test_stop_strings_stop_when_the_match_overlaps_the_last_token(pieces, stops):
    ids = torch.tensor([[8, 8] + [PieceTokenizer.pieces.index(p) for p in pieces]])
    assert StopStrings(PieceTokenizer(), ["stop"])(ids, None).tolist() == [stops]


def test_stop_strings_end_each_row_at_its_match(pair, tokenizer):
    """transformers' StopStringCriteria cannot read this word-level vocabulary (the SmolLM2 test
    compares with it); here: each row ends at its first stop word or eos, then pads."""
    ids, mask = batch()
    free = free_tokens(pair, ids, mask).tolist()
    stop_id = free[0][3]
    stop = tokenizer.decode([stop_id])  # row 0's 4th token, a whole word
    got = pair[1].generate(ids, attention_mask=mask, max_new_tokens=NEW, stop_strings=[stop, "never"],
                           tokenizer=tokenizer, eos_token_id=2, pad_token_id=0)[:, ids.shape[1] :].tolist()
    ends = [next((i for i, t in enumerate(row) if t in (2, stop_id)), NEW - 1) for row in free]
    expected = [row[: end + 1] + [0] * (max(ends) - end) for row, end in zip(free, ends)]
    assert ends[0] <= 3 and got == expected


# ------------------------------------------------------------------------------ GenerationConfig
def test_generation_config_precedence_as_transformers(pair):
    import transformers

    hf, ours = pair
    ids, mask = batch()
    theirs = transformers.GenerationConfig(max_new_tokens=7, repetition_penalty=1.3, eos_token_id=[])
    for config in (theirs, GenerationConfig(max_new_tokens=7, repetition_penalty=1.3, eos_token_id=[])):
        got = ours.generate(ids, attention_mask=mask, generation_config=config)
        assert torch.equal(got, hf.generate(ids, attention_mask=mask, generation_config=theirs))
        assert got.shape[1] == ids.shape[1] + 7
        # explicit arguments win over the config
        over = ours.generate(ids, attention_mask=mask, generation_config=config, max_new_tokens=3)
        assert torch.equal(over, hf.generate(ids, attention_mask=mask, generation_config=theirs, max_new_tokens=3))
    # model.generation_config gives the defaults; a passed config and the arguments override it
    ours.generation_config.max_new_tokens, hf.generation_config.max_new_tokens = 4, 4
    try:
        assert ours.generate(ids, attention_mask=mask).shape[1] == ids.shape[1] + 4
        assert torch.equal(ours.generate(ids, attention_mask=mask), hf.generate(ids, attention_mask=mask))
        assert ours.generate(ids, attention_mask=mask, generation_config=theirs).shape[1] == ids.shape[1] + 7
    finally:
        ours.generation_config.max_new_tokens, hf.generation_config.max_new_tokens = None, None


def test_generation_config_from_model_config_follows_it_until_changed():
    config = llama_port.LlamaConfig.from_dict({**llama_port.LlamaConfig().to_dict(), "eos_token_id": [2, 3]})
    derived = GenerationConfig.from_model_config(config)
    assert (derived.bos_token_id, derived.eos_token_id, derived.pad_token_id) == (
        config.bos_token_id, [2, 3], config.pad_token_id
    )
    assert derived.to_dict()["_from_model_config"] is True
    config.eos_token_id = 5
    assert derived.following(config).eos_token_id == 5  # untouched: follows the model config
    derived.eos_token_id = 9
    assert derived.following(config).eos_token_id == 9  # set by the user: stays


def test_generation_config_json_round_trip_with_transformers(tmp_path):
    import transformers

    config = GenerationConfig(max_new_tokens=5, do_sample=True, top_p=0.8, eos_token_id=[2, 3], extra={"foo": 1})
    config.save_pretrained(tmp_path)
    values = json.loads((tmp_path / "generation_config.json").read_text())
    assert values == {"max_new_tokens": 5, "do_sample": True, "top_p": 0.8, "eos_token_id": [2, 3], "foo": 1}
    assert GenerationConfig.from_pretrained(tmp_path) == config
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (theirs.max_new_tokens, theirs.top_p, theirs.eos_token_id) == (5, 0.8, [2, 3])
    # update() sets fields and hands back the rest, as transformers'
    assert config.update(top_k=7, not_a_field=1) == {"not_a_field": 1} and config.top_k == 7


def test_save_and_from_pretrained_carry_generation_config(pair, tmp_path):
    import transformers

    _, ours = pair
    ours.save_pretrained(tmp_path / "derived")
    written = json.loads((tmp_path / "derived" / "generation_config.json").read_text())
    assert written == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "_from_model_config": True}
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "derived")
    assert (hf.generation_config.eos_token_id, hf.generation_config.pad_token_id) == (2, 0)

    ours.generation_config = GenerationConfig(max_new_tokens=3, repetition_penalty=1.2, eos_token_id=[], pad_token_id=0)
    try:
        ours.save_pretrained(tmp_path / "own")
    finally:
        ours.generation_config = GenerationConfig.from_model_config(ours.config)
    loaded = llama_port.LlamaForCausalLM.from_pretrained(tmp_path / "own")
    assert loaded.generation_config.max_new_tokens == 3 and loaded.generation_config.repetition_penalty == 1.2
    ids, mask = batch()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "own", attn_implementation="sdpa")
    assert torch.equal(loaded.generate(ids, attention_mask=mask), hf.generate(ids, attention_mask=mask))
    # no generation_config.json: derived from config.json
    (tmp_path / "own" / "generation_config.json").unlink()
    bare = llama_port.LlamaForCausalLM.from_pretrained(tmp_path / "own")
    assert bare.generation_config.max_new_tokens is None and bare.generation_config.eos_token_id == 2
    # a broken one is refused, naming the file
    (tmp_path / "own" / "generation_config.json").write_text("{not json")
    from llama_port.checkpoints.errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="generation_config.json: not valid JSON"):
        llama_port.LlamaForCausalLM.from_pretrained(tmp_path / "own")


# --------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(output_attentions=True), "output_attentions"),
        (dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [1]), "prefix_allowed_tokens_fn"),
        (dict(max_new_token=5), "max_new_token"),  # a typo
        (dict(num_return_sequences=2), "num_return_sequences"),  # greedy
        (dict(stop_strings=["x"]), "tokenizer"),
        (dict(max_length=3), "max_length"),  # no room past the prompt
        (dict(min_p=1.5, do_sample=True), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(generation_config=GenerationConfig(num_beams=4)), "num_beams"),
        (dict(generation_config=GenerationConfig(extra={"no_repeat_ngram_size": 3})), "no_repeat_ngram_size"),
    ],
)
def test_unimplemented_arguments_raise_value_error_naming_them(pair, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pair[1].generate(torch.tensor([[5, 6, 7]]), **kwargs)


def test_transformers_config_with_an_unimplemented_option_raises(pair):
    import transformers

    with pytest.raises(ValueError, match="typical_p"):
        pair[1].generate(torch.tensor([[5, 6, 7]]), generation_config=transformers.GenerationConfig(typical_p=0.5))


def test_off_values_and_none_are_accepted(pair):
    out = pair[1].generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, num_beams=1, output_attentions=False,
                           prefix_allowed_tokens_fn=None, use_cache=False)
    assert out.shape == (1, 5)


# ------------------------------------------------------------------------ the real SmolLM2-135M
@pytest.mark.slow
def test_smollm2_generation_arguments_match_transformers(smollm2_pair):
    hf, ours, tokenizer = smollm2_pair
    encoded = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    import transformers

    for kwargs in (
        dict(max_new_tokens=24, repetition_penalty=1.3),
        dict(generation_config=transformers.GenerationConfig(max_new_tokens=24, min_new_tokens=10)),
        dict(max_new_tokens=32, stop_strings=["\n", "."], tokenizer=tokenizer),
    ):
        expected = hf.generate(**encoded, do_sample=False, **kwargs)
        got = ours.generate(**encoded, do_sample=False, **kwargs)
        assert torch.equal(got, expected), (kwargs, tokenizer.batch_decode(got))
