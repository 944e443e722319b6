"""Text generation for LlamaForCausalLM: ``generate()`` and what it is made of.

    generate.py    GenerationMixin.generate: arguments, defaults, the token loop, start_decoding
    decoding.py    prefill, decode_step, the static- and dynamic-cache decoders
    compile.py     torch.compile of the decode step and its inductor settings
    sampling.py    temperature, top-k, top-p, sampling
    stopping.py    end-of-sequence ids
    streamers.py   the streamer protocol; timing and printing streamers
    benchmark.py   decode and prefill speed against transformers' generate (``llama-port bench``)

Needs torch alone; nothing here imports the model classes (they are passed in).
"""

from .decoding import decode_step
from .generate import CACHE_IMPLEMENTATIONS, GenerationMixin, start_decoding
from .sampling import apply_temperature, next_tokens_from_logits, sample_token, top_k_filter, top_p_filter
from .stopping import eos_token_ids, until_eos
from .streamers import Streamer, TextStreamPrinter, TimingStreamer

__all__ = [
    "CACHE_IMPLEMENTATIONS",
    "GenerationMixin",
    "Streamer",
    "TextStreamPrinter",
    "TimingStreamer",
    "apply_temperature",
    "decode_step",
    "eos_token_ids",
    "next_tokens_from_logits",
    "sample_token",
    "start_decoding",
    "top_k_filter",
    "top_p_filter",
    "until_eos",
]
