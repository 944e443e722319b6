"""Text generation for LlamaForCausalLM: greedy or sampled decoding over a KV cache.

One prefill forward over the prompt fills the cache, then one forward per new token, of which only
the last position reaches the head (``logits_to_keep=1``). Batched prompts are left-padded: a
token's position counts the real tokens before it (``attention_mask.cumsum(-1) - 1``, pads at 0, as
transformers does) and the padding mask gains one column per step. Each row stops at its first
end-of-sequence id (any of several: Llama 3 Instruct ends a turn with <|eot_id|>); finished rows
are padded with ``pad_token_id`` until every row is done or ``max_new_tokens`` is reached.

The decode step with a static cache is built for low per-token overhead, as gpt-fast's: the keys and
values go into preallocated buffers at ``cache_position``, and the mask is not rebuilt each step:
generate() keeps a (B, S) padding mask over the whole cache (the unwritten slots False), hands the
model a view of it in the backend's mask format, and sets one column per step in place. A single
query token needs no causal part (every written slot is in its past), so that column is all the
update there is. Positions and the cache slot are tensors, updated in place, so ``compile=True``
captures one graph for the whole decode and never recompiles per token (see CPU_COMPILE_OPTIONS
for what makes the compiled CPU step fast). The dynamic cache instead follows transformers'
generate step for step (the 2-D mask grows by a column, the model builds its mask from it).

Measured by scripts/bench_generate.py (SmolLM2-135M, float32, 2-core AVX-512 CPU, 2 threads,
128 greedy tokens): transformers 18 tokens/s, ours eager 19, ours compiled 48; prefill of 512
tokens the same on both sides (~0.8 s).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .cache import DynamicCache, KVCache, StaticCache

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
# Rope types whose frequencies are rescaled past max_position_embeddings: generating past it is
# allowed for them (with a warning); for the others it is an error.
EXTRAPOLATING_ROPE_TYPES = ("dynamic",)
# Rope types whose frequencies change with the position (a data-dependent branch each forward),
# which a compiled step cannot capture in one graph.
POSITION_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


class Streamer(Protocol):
    """transformers' streamer protocol (``TextStreamer`` fits): ``put`` gets the prompt (B, T) first,
    then each step's new tokens (B,), on the CPU; ``end`` is called once generation stops."""

    def put(self, value: Tensor) -> None: ...

    def end(self) -> None: ...


# ------------------------------------------------------------------------------ sampling filters
def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature: below 1 sharpens the distribution, above 1 flattens it
    (transformers' TemperatureLogitsWarper). temperature must be > 0."""
    return logits / temperature


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Logits (B, V) with all but each row's ``top_k`` largest set to -inf; values tied with the
    k-th largest are kept too (transformers' TopKLogitsWarper). top_k >= V leaves them unchanged."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019): logits (B, V) with all but the smallest set of most
    likely tokens whose cumulative probability reaches ``top_p`` set to -inf. The most likely token
    always stays. As transformers' TopPLogitsWarper: sorted ascending, the tail whose total mass is
    at most 1 - top_p goes."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)  # (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # at least one token
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def sample_token(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row (B,), drawn from softmax(logits (B, V)) with ``generator``'s RNG."""
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def next_tokens_from_logits(
    logits: Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row (B,) from float32 logits (B, V): argmax, or temperature -> top-k -> top-p
    -> sample (transformers' warper order)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return sample_token(logits, generator)


# ---------------------------------------------------------------------------------- decode step
def decode_step(
    model: torch.nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    cache_position: Tensor,
    attention_mask: object,
    past_key_values: KVCache,
) -> Tensor:
    """One token per row (B, 1) at ``position_ids`` (B, 1), written to cache slot ``cache_position``
    (1,) -> next-token logits (B, V). What ``compile=True`` hands to torch.compile."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=True,
        cache_position=cache_position,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


# Inductor options for the decode step off CUDA. A one-token step is a chain of matrix-vector
# products whose speed is how fast the weights stream from memory; MKL's sgemv reaches about half
# of the machine's read bandwidth there. Freezing folds the weights into the graph as constants, so
# inductor can prepack them for its C++ GEMM template (vectorised micro-kernels over the packed
# weights), which max_autotune enables. ATEN (MKL) is left out of the candidates on purpose:
# autotuning times each candidate on warm caches, where MKL often wins, but the real step streams
# 0.5 GB of weights from DRAM, where the template is about twice as fast (SmolLM2-135M on the
# 2-core AVX-512 benchmark machine: ~21 ms per token against ~42 ms with MKL's kernels picked).
# The price: a minute or so of compiling per set of shapes, and weights changed after compiling
# are not seen (torch._dynamo.reset() forgets the graphs).
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
# Where the C++ template cannot compile a product (no candidate left), retry once with MKL allowed.
CPU_COMPILE_FALLBACK_OPTIONS = {**CPU_COMPILE_OPTIONS, "max_autotune_gemm_backends": "CPP,ATEN"}
# A compiled step is specialised to the cache length; rounding it up lets prompts of different
# lengths share one graph (the extra slots stay masked).
COMPILED_CACHE_LEN_MULTIPLE = 256

_COMPILED_DECODE_STEPS: dict[str, Callable[..., Tensor]] = {}


def compiled_decode_step(device_type: str) -> Callable[..., Tensor]:
    """``decode_step`` under torch.compile, whole-graph, static shapes: CUDA graphs
    ("reduce-overhead") on CUDA, ``CPU_COMPILE_OPTIONS`` elsewhere. Built once per device type;
    dynamo keeps a graph per model and shapes."""
    if device_type not in _COMPILED_DECODE_STEPS:
        if device_type == "cuda":
            step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        else:
            step = _with_inductor_config(torch.compile(decode_step, fullgraph=True, dynamic=False), CPU_COMPILE_OPTIONS)
        _COMPILED_DECODE_STEPS[device_type] = step
    return _COMPILED_DECODE_STEPS[device_type]


def _with_inductor_config(fn: Callable[..., Tensor], options: dict[str, object]) -> Callable[..., Tensor]:
    """``fn`` run with inductor's global config patched by ``options`` (compilation happens lazily,
    inside a call), falling back once to CPU_COMPILE_FALLBACK_OPTIONS if compiling fails. Not
    torch.compile(options=...): with these options passed there the step ran at eager speed, as
    if freezing were off (torch 2.13), while the same options set globally give the 2x."""
    import torch._inductor.config as inductor_config
    from torch._inductor.exc import InductorError

    current = options

    def run(*args: object) -> Tensor:
        nonlocal current
        try:
            with inductor_config.patch(current):
                return fn(*args)
        except InductorError as err:  # raised while compiling, never by a compiled graph running
            if current == CPU_COMPILE_FALLBACK_OPTIONS:
                raise
            warnings.warn(f"compiling the decode step failed ({err}); retrying with MKL allowed", stacklevel=2)
            current = CPU_COMPILE_FALLBACK_OPTIONS
            with inductor_config.patch(current):
                return fn(*args)

    return run


class _StaticDecoder:
    """The static-cache decode loop's state: slot, positions and mask as tensors updated in place."""

    def __init__(self, model, cache: StaticCache, attention_mask: Tensor, next_position: Tensor, compile: bool):
        batch, prompt_length = attention_mask.shape
        device = attention_mask.device
        self.model = model
        self.cache = cache
        self.position_ids = next_position  # (B, 1)
        self.cache_position = torch.tensor([prompt_length], device=device)  # (1,)
        # (B, S) over the whole cache: the prompt's padding, then unwritten (False) slots.
        self.key_mask = torch.zeros(batch, cache.max_cache_len, dtype=torch.bool, device=device)
        self.key_mask[:, :prompt_length] = attention_mask.bool()
        mask_format = model.attention_backend.mask_format
        self.additive = None
        if mask_format == "bool":
            self.mask = self.key_mask[:, None, None, :]  # (B, 1, 1, S) view: updates show through
        elif mask_format == "additive":
            dtype = model.dtype
            shape = (batch, 1, 1, cache.max_cache_len)
            self.additive = torch.full(shape, torch.finfo(dtype).min, dtype=dtype, device=device)
            self.additive.masked_fill_(self.key_mask[:, None, None, :], 0.0)
            self.mask = self.additive  # (B, 1, 1, S)
        elif mask_format == "varlen":
            from .attention import VarlenMask

            self.mask = VarlenMask(key_padding_mask=self.key_mask)
        else:
            raise ValueError(f"mask_format={mask_format!r} of attn_implementation={model.attn_implementation!r}")
        self.compiled = compile
        self.step_fn = compiled_decode_step(device.type) if compile else decode_step

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B, 1) -> next-token logits (B, V)."""
        # The new token attends to itself: open its slot. The only mask update there is.
        self.key_mask.index_fill_(1, self.cache_position, True)
        if self.additive is not None:
            self.additive.index_fill_(-1, self.cache_position, 0.0)
        if self.compiled and self.cache_position.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.step_fn(self.model, tokens, self.position_ids, self.cache_position, self.mask, self.cache)
        if self.compiled:
            self.cache.advance(1)  # the compiled update skipped the host counter (see StaticCache)
        self.cache_position += 1
        self.position_ids += 1
        return logits


class _DynamicDecoder:
    """The dynamic-cache decode loop: the 2-D padding mask grows by a column and the model builds
    its mask from it, exactly as transformers' generate does."""

    def __init__(self, model, cache: DynamicCache, attention_mask: Tensor, next_position: Tensor):
        self.model = model
        self.cache = cache
        self.attention_mask = attention_mask  # (B, S)
        self.position_ids = next_position  # (B, 1)

    def __call__(self, tokens: Tensor) -> Tensor:
        ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)  # (B, S + 1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.position_ids = self.position_ids + 1
        return out.logits[:, -1, :]


# ------------------------------------------------------------------------------------- generate
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
        rope_type = config.rope_parameters["rope_type"]
        if compile and rope_type in POSITION_DEPENDENT_ROPE_TYPES:
            raise ValueError(
                f"compile=True: rope_type={rope_type!r} changes its frequencies with the position, which "
                f"one compiled graph cannot capture; use compile=False"
            )
        longest = int(attention_mask.sum(-1).max()) + max_new_tokens
        if longest > config.max_position_embeddings:
            message = (
                f"prompt ({longest - max_new_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {longest} "
                f"exceeds max_position_embeddings={config.max_position_embeddings}"
            )
            if rope_type not in EXTRAPOLATING_ROPE_TYPES:
                raise ValueError(f"{message}; lower max_new_tokens or shorten the prompt")
            warnings.warn(f"{message}; rope_type={rope_type!r} extrapolates past it", stacklevel=2)

        eos_ids = _as_id_list(config.eos_token_id if eos_token_id is None else eos_token_id)
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)

        with torch.inference_mode():
            return self._generate(
                input_ids.to(self.device),
                attention_mask.to(self.device),
                max_new_tokens,
                do_sample,
                temperature,
                top_k,
                top_p,
                eos_ids,
                pad_token_id,
                cache_implementation,
                streamer,
                callback,
                generator,
                compile,
            )

    def _generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        eos_ids: list[int],
        pad_token_id: int,
        cache_implementation: str,
        streamer: Streamer | None,
        callback: Callable[[Tensor], None] | None,
        generator: torch.Generator | None,
        compile: bool,
    ) -> Tensor:
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits, decoder = self._start_decoding(
            input_ids, attention_mask, max_new_tokens, cache_implementation, compile
        )
        batch, device = input_ids.shape[0], input_ids.device
        eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        new_tokens: list[Tensor] = []
        for step in range(max_new_tokens):
            # parity: choose in float32 whatever the model dtype, as transformers does
            tokens = next_tokens_from_logits(logits.float(), do_sample, temperature, top_k, top_p, generator)
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
            if step + 1 < max_new_tokens:  # the last token needs no forward
                logits = decoder(tokens[:, None])
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

    def _start_decoding(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        cache_implementation: str,
        compile: bool = False,
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Prefill the prompt (B, T) into a new cache -> (its next-token logits (B, V), the decoder:
        a callable taking each step's tokens (B, 1) and returning the next logits (B, V))."""
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        # As transformers: positions count real tokens; pads sit at 0 (their keys are masked anyway).
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
        if cache_implementation == "static":
            cache_len = prompt_length + max_new_tokens
            if compile:
                cache_len = -(-cache_len // COMPILED_CACHE_LEN_MULTIPLE) * COMPILED_CACHE_LEN_MULTIPLE
            cache: KVCache = StaticCache(self.config, batch, cache_len, device, self.dtype)
        else:
            cache = DynamicCache()
        logits = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]  # (B, V)
        next_position = position_ids[:, -1:] + 1  # (B, 1): left padding, so the last token is real
        if cache_implementation == "static":
            return logits, _StaticDecoder(self, cache, attention_mask, next_position, compile)
        return logits, _DynamicDecoder(self, cache, attention_mask, next_position)


# ------------------------------------------------------------------------------------ validation
def _as_id_list(ids: int | Sequence[int] | Tensor | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, Tensor):
        return [int(i) for i in ids.flatten().tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


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
    if temperature is None or temperature < 0:
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


__all__ = [
    "GenerationMixin",
    "apply_temperature",
    "decode_step",
    "next_tokens_from_logits",
    "sample_token",
    "top_k_filter",
    "top_p_filter",
]
