"""Text generation for LlamaForCausalLM: ``generate()`` and what it is made of.

    generate.py    GenerationMixin.generate: arguments, defaults, the token loop, start_decoding
    config.py      GenerationConfig (generation_config.json) and transformers' defaults
    outputs.py     GenerateOutput (return_dict_in_generate)
    decoding.py    prefill, decode_step, the static- and dynamic-cache decoders
    compile.py     torch.compile of the decode step and its inductor settings
    processors.py  logits processors in transformers' order: repetition penalty, min length, warpers
    sampling.py    temperature, top-k, top-p, sampling
    stopping.py    end-of-sequence ids, stop strings
    streamers.py   the streamer protocol; timing and printing streamers
    benchmark.py   decode and prefill speed against transformers' generate (``llama-port bench``)

Needs torch alone; nothing here imports the model classes (they are passed in).
"""

from .config import GENERATION_CONFIG_NAME, GenerationConfig
from .decoding import decode_step
from .generate import CACHE_IMPLEMENTATIONS, GenerationMixin, start_decoding
from .outputs import GenerateOutput
from .processors import MinLength, RepetitionPenalty, min_p_filter, next_tokens_from_logits, sampling_warpers
from .sampling import apply_temperature, sample_token, top_k_filter, top_p_filter
from .stopping import StopStrings, eos_token_ids, until_eos
from .streamers import Streamer, TextStreamPrinter, TimingStreamer

__all__ = [
    "CACHE_IMPLEMENTATIONS",
    "GENERATION_CONFIG_NAME",
    "GenerateOutput",
    "GenerationConfig",
    "GenerationMixin",
    "MinLength",
    "RepetitionPenalty",
    "StopStrings",
    "Streamer",
    "TextStreamPrinter",
    "TimingStreamer",
    "apply_temperature",
    "decode_step",
    "eos_token_ids",
    "min_p_filter",
    "next_tokens_from_logits",
    "sample_token",
    "sampling_warpers",
    "start_decoding",
    "top_k_filter",
    "top_p_filter",
    "until_eos",
]
