"""Text generation for LlamaForCausalLM: greedy or sampled decoding over a KV cache.

One prefill forward over the prompt fills the cache, then one forward per new token, of which only
the last position reaches the head (``logits_to_keep=1``). Batched prompts are left-padded: a
token's position counts the real tokens before it (``attention_mask.cumsum(-1) - 1``, pads at 0, as
transformers does) and the padding mask gains one column per step. Each row stops at its first
end-of-sequence id (any of several: Llama 3 Instruct ends a turn with <|eot_id|>); finished rows
are padded with ``pad_token_id`` until every row is done or ``max_new_tokens`` is reached.

The decode loops themselves are in decoding.py, the compile settings in compile.py, the sampling
filters in sampling.py.

Measured by scripts/bench_generate.py (SmolLM2-135M, float32, 2-core AVX-512 CPU, 2 threads,
128 greedy tokens): transformers 18 tokens/s, ours eager 19, ours compiled 48; prefill of 512
tokens the same on both sides (~0.8 s).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..cache import DynamicCache, StaticCache
from ..rope import ROPE_TYPES
from .compile import COMPILED_CACHE_LEN_MULTIPLE, compiled_decode_step
from .decoding import DynamicDecoder, StaticDecoder, decode_step, prefill
from .sampling import next_tokens_from_logits
from .stopping import eos_token_ids
from .streamers import Streamer

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
Decoder = Callable[[Tensor], Tensor]  # each step's tokens (B, 1) -> the next logits (B, V)


@dataclass(frozen=True)
class DecodingSettings:
    """How generate() picks and stops, checked and with its defaults resolved."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_ids: list[int]
    pad_token_id: int
    cache_implementation: str
    compile: bool
    generator: torch.Generator | None


class GenerationMixin:
    """Adds ``generate()`` to LlamaForCausalLM."""

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        cache_implementation: str = "dynamic",
        streamer: Streamer | None = None,
        callback: Callable[[Tensor], None] | None = None,
        seed: int | None = None,
        compile: bool = False,
    ) -> Tensor:
        """Prompt plus new tokens (B, T + N), N <= max_new_tokens, as transformers' generate returns.

        input_ids: (B, T) prompt ids, left-padded when the prompts differ in length, with
            attention_mask (B, T) 1 for real tokens and 0 for the pads (default: all real).
        do_sample: False: greedy (argmax; temperature, top_k and top_p unused). True: sample from
            softmax(logits / temperature) restricted to the top_k most likely tokens (None or 0:
            no limit), then to the nucleus of mass top_p (None or 1: no limit).
        eos_token_id: id or ids that end a row (default: config.eos_token_id; [] never stops early).
        pad_token_id: fills rows that have ended (default: config.pad_token_id, else the first eos).
        cache_implementation: "dynamic" (grows by concatenation) or "static" (preallocated to
            T + max_new_tokens, updated in place: the fast decode path, needed by ``compile``).
        streamer: gets the prompt, then each step's tokens (B,) on the CPU (transformers' protocol).
        callback: called with each step's tokens (B,) on the model's device.
        seed: seeds a private torch.Generator for sampling; the global RNG is left alone.
        compile: torch.compile the single-token decode step (static cache only): CUDA graphs on
            CUDA; on CPU inductor with frozen, prepacked weights (see CPU_COMPILE_OPTIONS: weights
            changed afterwards are not seen until torch._dynamo.reset()). The first call compiles
            (a minute or two on CPU); later calls with the same batch size, dtype and rounded cache
            length (COMPILED_CACHE_LEN_MULTIPLE) reuse the graph, which never recompiles per token.

        Raises ValueError for an empty prompt, ids outside the vocabulary, a prompt plus
        max_new_tokens longer than max_position_embeddings (a warning instead for rope types that
        extrapolate: "dynamic"), max_new_tokens < 1, a negative temperature (or 0 when sampling),
        top_p outside (0, 1], a negative top_k, an unknown cache_implementation.
        """
        config = self.config
        input_ids, attention_mask = _check_prompt(input_ids, attention_mask, config.vocab_size)
        _check_generation_arguments(max_new_tokens, do_sample, temperature, top_k, top_p, cache_implementation)
        if compile and cache_implementation != "static":
            raise ValueError("compile=True needs cache_implementation='static' (fixed shapes)")
        rope_name = config.rope_parameters["rope_type"]
        rope_type = ROPE_TYPES[rope_name]
        if compile and rope_type.position_dependent:
            raise ValueError(
                f"compile=True: rope_type={rope_name!r} changes its frequencies with the position, which "
                f"one compiled graph cannot capture; use compile=False"
            )
        longest = int(attention_mask.sum(-1).max()) + max_new_tokens
        if longest > config.max_position_embeddings:
            message = (
                f"prompt ({longest - max_new_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {longest} "
                f"exceeds max_position_embeddings={config.max_position_embeddings}"
            )
            if not rope_type.extrapolates:
                raise ValueError(f"{message}; lower max_new_tokens or shorten the prompt")
            warnings.warn(f"{message}; rope_type={rope_name!r} extrapolates past it", stacklevel=2)

        eos_ids = eos_token_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        settings = DecodingSettings(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_ids=eos_ids, pad_token_id=pad_token_id, cache_implementation=cache_implementation, compile=compile,
            generator=generator,
        )
        with torch.inference_mode():
            return _generate(
                self, input_ids.to(self.device), attention_mask.to(self.device), settings, streamer, callback
            )


def _generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    settings: DecodingSettings,
    streamer: Streamer | None,
    callback: Callable[[Tensor], None] | None,
) -> Tensor:
    """The loop: prefill, then pick, stream and decode until every row ended or max_new_tokens."""
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits, decoder = start_decoding(
        model, input_ids, attention_mask, settings.max_new_tokens, settings.cache_implementation, settings.compile
    )
    batch, device = input_ids.shape[0], input_ids.device
    eos_ids, pad_token_id = settings.eos_ids, settings.pad_token_id
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    new_tokens: list[Tensor] = []
    for step in range(settings.max_new_tokens):
        # parity: choose in float32 whatever the model dtype, as transformers does
        tokens = next_tokens_from_logits(
            logits.float(), settings.do_sample, settings.temperature, settings.top_k, settings.top_p,
            settings.generator,
        )
        if len(eos_ids):
            tokens = torch.where(unfinished, tokens, pad_token_id)  # finished rows get pads
        new_tokens.append(tokens)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if callback is not None:
            callback(tokens)
        if len(eos_ids):
            unfinished &= ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                break
        if step + 1 < settings.max_new_tokens:  # the last token needs no forward
            logits = decoder(tokens[:, None])
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def start_decoding(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    cache_implementation: str,
    compile: bool = False,
) -> tuple[Tensor, Decoder]:
    """Prefill the prompt (B, T) into a new cache -> (its next-token logits (B, V), the decoder:
    a callable taking each step's tokens (B, 1) and returning the next logits (B, V))."""
    batch, prompt_length = input_ids.shape
    if cache_implementation == "static":
        cache_len = prompt_length + max_new_tokens
        if compile:
            cache_len = -(-cache_len // COMPILED_CACHE_LEN_MULTIPLE) * COMPILED_CACHE_LEN_MULTIPLE
        cache = StaticCache(model.config, batch, cache_len, input_ids.device, model.dtype)
        logits, next_position = prefill(model, input_ids, attention_mask, cache)
        step = compiled_decode_step(input_ids.device.type) if compile else decode_step
        return logits, StaticDecoder(model, cache, attention_mask, next_position, step, compiled=compile)
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


def _check_generation_arguments(
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    cache_implementation: str,
) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1")
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}; expected a float > 0 (or do_sample=False for greedy)")
    if do_sample and temperature == 0:
        raise ValueError("temperature=0 with do_sample=True; use do_sample=False for greedy decoding")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}; expected a float in (0, 1]")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}; expected an int >= 1 (0 or None: no top-k filtering)")
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation={cache_implementation!r}; expected one of {list(CACHE_IMPLEMENTATIONS)}"
        )
