"""Text generation for LlamaForCausalLM: greedy or sampled decoding over a KV cache.

One prefill forward over the prompt fills the cache, then one forward per new token, of which only
the last position reaches the head (``logits_to_keep=1``). Batched prompts are left-padded: a
token's position counts the real tokens before it (``attention_mask.cumsum(-1) - 1``, pads at 0, as
transformers does) and the padding mask gains one column per step. Each row stops at its first
end-of-sequence id (any of several: Llama 3 Instruct ends a turn with <|eot_id|>), stop string
or stopping criterion; once a row has ended on eos it is padded with ``pad_token_id`` until every
row is done or ``max_new_tokens`` is reached (transformers' _sample, step for step).

The arguments' defaults are resolved in config.py's order (explicit > generation_config >
model.generation_config > transformers' defaults). The decode loops themselves are in decoding.py,
the compile settings in compile.py, the logits processors in processors.py (in transformers' order),
the sampling filters in sampling.py.

Speed: ``llama-port bench`` (generation/benchmark.py) measures every configuration against
transformers and llama.cpp in one run; the figures are in the README ("Generation speed").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..cache import DynamicCache, StaticCache, key_value_heads
from ..rope import ROPE_TYPES
from .compile import COMPILED_CACHE_LEN_MULTIPLE, compile_mode, compiled_decode_step
from .config import DEFAULTS, UNSUPPORTED, GenerationConfig, as_generation_config
from .decoding import DynamicDecoder, StaticDecoder, decode_step, prefill
from .outputs import GenerateOutput
from .processors import LogitsProcessor, MinLength, RepetitionPenalty, apply_processors, sampling_warpers
from .sampling import sample_token
from .stopping import StopStrings, eos_token_ids
from .streamers import Streamer

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
Decoder = Callable[[Tensor], Tensor]  # each step's tokens (B, 1) -> the next logits (B, V)
# (sequences so far (B, S), the scores collected or None) -> done: a bool, or bools (B,) per row
StoppingCriterion = Callable[[Tensor, Any], "Tensor | bool"]


@dataclass(frozen=True)
class DecodingSettings:
    """How generate() picks and stops, checked and with its defaults resolved.

    processors: every logits processor in transformers' order (processors.py), warpers included.
    criteria: the stopping criteria besides eos and the length (stop strings, the caller's).
    """

    max_new_tokens: int
    do_sample: bool
    processors: list[LogitsProcessor]
    criteria: list[StoppingCriterion]
    eos_ids: list[int]
    pad_token_id: int
    output_scores: bool
    output_logits: bool
    cache_implementation: str
    compile: str | None  # a mode of compile.COMPILE_MODES, or None
    generator: torch.Generator | None


class GenerationMixin:
    """Adds ``generate()`` to LlamaForCausalLM (which sets ``self.generation_config``)."""

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        generation_config: Any = None,
        logits_processor: Sequence[LogitsProcessor] | None = None,
        stopping_criteria: Sequence[StoppingCriterion] | None = None,
        max_length: int | None = None, max_new_tokens: int | None = None,
        min_length: int | None = None, min_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        num_return_sequences: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        return_dict_in_generate: bool | None = None,
        output_scores: bool | None = None,
        output_logits: bool | None = None,
        use_cache: bool | None = None,
        cache_implementation: str | None = None,
        streamer: Streamer | None = None,
        callback: Callable[[Tensor], None] | None = None,
        seed: int | None = None,
        compile: bool | str = False,
        **unused: Any,
    ) -> Tensor | GenerateOutput:
        """Prompt plus new tokens (B * num_return_sequences, T + N), as transformers' generate
        returns; a GenerateOutput with return_dict_in_generate.

        Every generation argument left None comes from ``generation_config`` (ours or a transformers
        GenerationConfig), else ``self.generation_config``, else transformers' defaults
        (config.DEFAULTS: 20 new tokens, greedy, top_k=50 when sampling): transformers' precedence.

        input_ids: (B, T) prompt ids, left-padded when the prompts differ in length, with
            attention_mask (B, T) 1 for real tokens and 0 for the pads (default: all real).
        max_new_tokens / max_length: new tokens / total length (T included); max_new_tokens wins.
            Neither set: 20 new tokens, no further than max_position_embeddings.
        min_new_tokens / min_length: eos ids are at -inf until then (min_new_tokens wins).
        do_sample: False: greedy (argmax of the processed scores). True: sample from softmax of the
            scores warped by temperature -> top_k (0: none) -> top_p (1: none) -> min_p, as transformers.
        repetition_penalty: transformers' (1: none), applied first; the left padding is not penalised.
        num_return_sequences: rows repeated (repeat_interleave) before sampling; needs do_sample.
        eos_token_id: id or ids that end a row ([] never stops early). pad_token_id: fills rows that
            have ended (default: the first eos). bos_token_id: unused with a prompt, as in transformers.
        stop_strings: a row ends when its text holds one, overlapping the last token
            (transformers' StopStringCriteria); needs ``tokenizer``.
        logits_processor: callables (input_ids (B, S), scores (B, V)) -> scores, applied after the
            repetition penalty and min length, before the warpers (transformers' order).
        stopping_criteria: callables (input_ids (B, S), scores) -> bool or bools (B,): True ends the
            row (transformers' StoppingCriteria; a LogitsProcessorList / StoppingCriteriaList works).
        return_dict_in_generate: return a GenerateOutput; with output_scores its ``scores`` (the
            processed scores per step), with output_logits its ``logits`` (the raw ones).
        use_cache: accepted; the KV cache is always used.
        cache_implementation: "dynamic" (grows by concatenation, the default) or "static"
            (preallocated to T + max_new_tokens, updated in place: the fast decode path, needed by
            ``compile``).
        streamer: gets the prompt, then each step's tokens (B,) on the CPU (transformers' protocol).
        callback: called with each step's tokens (B,) on the model's device.
        seed: seeds a private torch.Generator for sampling, leaving the global RNG alone; None:
            the global RNG, drawn from as transformers draws (one multinomial per step).
        compile: torch.compile the single-token decode step (static cache only): CUDA graphs on
            CUDA; on CPU inductor (see compile.cpu_compile_options). True: the "default" mode, the
            weights inputs of the graph, kept in the persistent compile cache
            (LLAMA_PORT_COMPILE_CACHE), so only the first process on a model's shapes compiles (half
            a minute or more on CPU) and later ones load it in seconds; "max-autotune": the weights
            frozen into the graph (changed afterwards, they are not seen until
            torch._dynamo.reset()) and prepacked for inductor's C++ GEMM kernels, the fastest
            bfloat16 and int8 decode on CPU, compiled in every process. Later calls with
            the same batch size, dtype and rounded cache length (COMPILED_CACHE_LEN_MULTIPLE)
            reuse the graph, which never recompiles per token.

        Raises ValueError naming the argument for: an empty prompt, ids outside the vocabulary, a
        prompt plus max_new_tokens longer than max_position_embeddings (a warning instead for rope
        types that extrapolate: "dynamic"), a length < 1 new token, a negative temperature (or 0
        when sampling), top_p outside (0, 1], min_p outside [0, 1], a negative top_k, a
        repetition_penalty <= 0, num_return_sequences > 1 without sampling, stop_strings without a
        tokenizer, an unknown cache_implementation, and any other keyword: an option transformers
        has that generate() does not implement (num_beams > 1, output_attentions, ...) or a typo
        (None values and options set to their "off" value are accepted, as transformers ignores them).
        """
        _check_unused(unused)
        explicit = dict(
            max_length=max_length, max_new_tokens=max_new_tokens, min_length=min_length, min_new_tokens=min_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            stop_strings=stop_strings, return_dict_in_generate=return_dict_in_generate, output_scores=output_scores,
            output_logits=output_logits, use_cache=use_cache, cache_implementation=cache_implementation,
        )
        config = self.config
        model_default = self.generation_config
        if isinstance(model_default, GenerationConfig):  # (a transformers one assigned to it is read as it is)
            model_default = model_default.following(config)
        resolved, default_max_length = resolve_generation_config(model_default, generation_config, explicit)
        input_ids, attention_mask = _check_prompt(input_ids, attention_mask, config.vocab_size)
        prompt_width = input_ids.shape[1]
        if resolved.max_new_tokens is not None:
            new_tokens = resolved.max_new_tokens
        elif default_max_length:
            new_tokens = min(resolved.max_length + prompt_width, config.max_position_embeddings) - prompt_width
        else:
            new_tokens = resolved.max_length - prompt_width
        cache = resolved.cache_implementation or "dynamic"
        _check_generation_arguments(new_tokens, resolved, cache, tokenizer)
        mode = compile_mode(compile)
        if mode and cache != "static":
            raise ValueError("compile=True needs cache_implementation='static' (fixed shapes)")
        rope_name = config.rope_parameters["rope_type"]
        rope_type = ROPE_TYPES[rope_name]
        if mode and rope_type.position_dependent:
            raise ValueError(
                f"compile=True: rope_type={rope_name!r} changes its frequencies with the position, which "
                f"one compiled graph cannot capture; use compile=False"
            )
        longest = int(attention_mask.sum(-1).max()) + new_tokens
        if longest > config.max_position_embeddings:
            message = (
                f"prompt ({longest - new_tokens} tokens) + max_new_tokens ({new_tokens}) = {longest} "
                f"exceeds max_position_embeddings={config.max_position_embeddings}"
            )
            if not rope_type.extrapolates:
                raise ValueError(f"{message}; lower max_new_tokens or shorten the prompt")
            warnings.warn(f"{message}; rope_type={rope_name!r} extrapolates past it", stacklevel=2)

        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if resolved.num_return_sequences > 1:  # as transformers: each prompt's copies side by side
            input_ids = input_ids.repeat_interleave(resolved.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(resolved.num_return_sequences, dim=0)
        eos_ids = eos_token_ids(resolved.eos_token_id)
        pad = resolved.pad_token_id if resolved.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        settings = DecodingSettings(
            max_new_tokens=new_tokens, do_sample=resolved.do_sample,
            processors=_processors(resolved, eos_ids, attention_mask, prompt_width, logits_processor),
            criteria=_criteria(resolved, tokenizer, stopping_criteria), eos_ids=eos_ids,
            pad_token_id=pad, output_scores=resolved.return_dict_in_generate and resolved.output_scores,
            output_logits=resolved.return_dict_in_generate and resolved.output_logits, cache_implementation=cache,
            compile=mode, generator=generator,
        )
        with torch.inference_mode():
            output = _generate(self, input_ids, attention_mask, settings, streamer, callback)
        return output if resolved.return_dict_in_generate else output.sequences


def resolve_generation_config(
    model_default: Any, generation_config: Any, explicit: dict[str, Any]
) -> tuple[GenerationConfig, bool]:
    """Every field's value by transformers' precedence: ``explicit`` (the arguments not None) >
    ``generation_config`` (ours or transformers', its fields not None) > ``model_default`` >
    DEFAULTS -> (that config, whether max_length came from DEFAULTS: then it counts new tokens)."""
    layers = [explicit, {} if generation_config is None else as_generation_config(generation_config).to_dict()]
    layers.append(as_generation_config(model_default).to_dict())
    values = {
        name: next((layer[name] for layer in layers if layer.get(name) is not None), DEFAULTS.get(name))
        for name in GenerationConfig.field_names()
    }
    return GenerationConfig(**values), all(layer.get("max_length") is None for layer in layers)


def _processors(
    config: GenerationConfig,
    eos_ids: list[int],
    attention_mask: Tensor,
    prompt_width: int,
    custom: Sequence[LogitsProcessor] | None,
) -> list[LogitsProcessor]:
    """The logits processors in transformers' order (see processors.py)."""
    processors: list[LogitsProcessor] = []
    if config.repetition_penalty != 1.0:
        padding_lengths = (attention_mask != 0).int().argmax(dim=1)  # (B,) left pads per row
        processors.append(RepetitionPenalty(float(config.repetition_penalty), padding_lengths))
    min_length = config.min_length if config.min_new_tokens is None else prompt_width + config.min_new_tokens
    if min_length > 0 and eos_ids:
        processors.append(MinLength(min_length, eos_ids))
    processors.extend(custom or [])
    if config.do_sample:
        processors.extend(sampling_warpers(config.temperature, config.top_k, config.top_p, config.min_p))
    return processors


def _criteria(
    config: GenerationConfig, tokenizer: Any, custom: Sequence[StoppingCriterion] | None
) -> list[StoppingCriterion]:
    """Stopping criteria besides eos and the length: the stop strings, then the caller's."""
    criteria: list[StoppingCriterion] = []
    if config.stop_strings:
        strings = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        criteria.append(StopStrings(tokenizer, strings))
    return criteria + list(custom or [])


def _generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    settings: DecodingSettings,
    streamer: Streamer | None,
    callback: Callable[[Tensor], None] | None,
) -> GenerateOutput:
    """The loop: prefill, then process, pick, stream and decode until every row ended or
    max_new_tokens, as transformers' _sample step for step."""
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits, decoder = start_decoding(
        model, input_ids, attention_mask, settings.max_new_tokens, settings.cache_implementation, settings.compile
    )
    batch, device = input_ids.shape[0], input_ids.device
    eos_ids, pad_token_id = settings.eos_ids, settings.pad_token_id
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    sequences = input_ids
    scores_seen: list[Tensor] | None = [] if settings.output_scores else None
    logits_seen: list[Tensor] = []
    can_stop = bool(eos_ids) or bool(settings.criteria)
    for step in range(settings.max_new_tokens):
        # parity: choose in float32 whatever the model dtype; a copy, as transformers takes, so that
        # neither an in-place processor nor the next step (CUDA graphs reuse their output) changes it
        raw = logits.to(dtype=torch.float32, copy=True)
        scores = apply_processors(settings.processors, sequences, raw)
        if scores_seen is not None:
            scores_seen.append(scores)
        if settings.output_logits:
            logits_seen.append(raw)
        tokens = sample_token(scores, settings.generator) if settings.do_sample else scores.argmax(dim=-1)
        if eos_ids:
            tokens = torch.where(unfinished, tokens, pad_token_id)  # finished rows get pads
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)  # (B, S + 1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if callback is not None:
            callback(tokens)
        if eos_ids:
            unfinished &= ~torch.isin(tokens, eos)
        for criterion in settings.criteria:  # transformers passes the scores collected so far, or None
            done = criterion(sequences, None if scores_seen is None else tuple(scores_seen))
            unfinished &= ~torch.as_tensor(done, device=device, dtype=torch.bool).expand(batch)
        if can_stop and not bool(unfinished.any()):
            break
        if step + 1 < settings.max_new_tokens:  # the last token needs no forward
            logits = decoder(tokens[:, None])
    if streamer is not None:
        streamer.end()
    return GenerateOutput(
        sequences=sequences,
        scores=None if scores_seen is None else tuple(scores_seen),
        logits=tuple(logits_seen) if settings.output_logits else None,
    )


def start_decoding(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    cache_implementation: str,
    compile: bool | str | None = False,
) -> tuple[Tensor, Decoder]:
    """Prefill the prompt (B, T) into a new cache -> (its next-token logits (B, V), the decoder:
    a callable taking each step's tokens (B, 1) and returning the next logits (B, V)).
    ``compile``: as generate()'s (True, False, None or a mode of compile.COMPILE_MODES)."""
    mode = compile_mode(compile)
    batch, prompt_length = input_ids.shape
    if cache_implementation == "static":
        cache_len = prompt_length + max_new_tokens
        if mode:
            cache_len = -(-cache_len // COMPILED_CACHE_LEN_MULTIPLE) * COMPILED_CACHE_LEN_MULTIPLE
        cache = StaticCache(model.config, batch, cache_len, input_ids.device, model.dtype, key_value_heads(model))
        logits, next_position = prefill(model, input_ids, attention_mask, cache)
        step = compiled_decode_step(input_ids.device.type, mode) if mode else decode_step
        return logits, StaticDecoder(model, cache, attention_mask, next_position, step, compiled=mode is not None)
    cache = DynamicCache()
    logits, next_position = prefill(model, input_ids, attention_mask, cache)
    return logits, DynamicDecoder(model, cache, attention_mask, next_position)


# ------------------------------------------------------------------------------------ validation
def _check_prompt(input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int) -> tuple[Tensor, Tensor]:
    """The prompt and its padding mask (default all ones), or a ValueError saying what is wrong."""
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a (B, T) tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty or not (B, T): shape {tuple(input_ids.shape)}; give at least one token")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids holds ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        if attention_mask.ndim == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected input_ids' {tuple(input_ids.shape)}"
            )
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        if not bool((attention_mask[:, -1] == 1).all()):
            raise ValueError(
                "attention_mask: some rows end in padding; generate() needs left padding "
                "(tokenizer.padding_side = 'left') so every row's last token is real"
            )
    return input_ids.long(), attention_mask


def _check_unused(unused: dict[str, Any]) -> None:
    """ValueError naming the keywords generate() does not implement; None values and transformers'
    options set to their "off" value (UNSUPPORTED) pass, as transformers ignores them."""
    rejected = [
        name for name, value in unused.items()
        if value is not None and not (name in UNSUPPORTED and value == UNSUPPORTED[name])
    ]
    if rejected:
        raise ValueError(
            f"generate() does not implement {sorted(rejected)} (a transformers option it lacks, or a typo)"
        )


def _check_generation_arguments(new_tokens: int, config: GenerationConfig, cache: str, tokenizer: Any) -> None:
    """ValueError naming the first resolved setting generate() cannot run with."""
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        which = "max_new_tokens" if config.max_new_tokens is not None else "max_length"
        raise ValueError(f"{which}={getattr(config, which)!r} leaves {new_tokens!r} new tokens; expected >= 1")
    temperature, top_k, top_p, min_p = config.temperature, config.top_k, config.top_p, config.min_p
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}; expected a float > 0 (or do_sample=False for greedy)")
    if config.do_sample and temperature == 0:
        raise ValueError("temperature=0 with do_sample=True; use do_sample=False for greedy decoding")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}; expected a float in (0, 1]")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p={min_p!r}; expected a float in [0, 1]")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}; expected an int >= 1 (0: no top-k filtering)")
    if not config.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={config.repetition_penalty!r}; expected a float > 0 (1: none)")
    for name in ("min_length", "min_new_tokens"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}={value!r}; expected an int >= 0")
    count = config.num_return_sequences
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"num_return_sequences={count!r}; expected an int >= 1")
    if count > 1 and not config.do_sample:
        raise ValueError(f"num_return_sequences={count} needs do_sample=True (greedy rows would all be the same)")
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= (the stop strings are matched on the decoded text)")
    if cache not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation={cache!r}; expected one of {list(CACHE_IMPLEMENTATIONS)}")
