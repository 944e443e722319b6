"""Streamers for generate() (transformers' protocol: ``put`` the prompt, then each step's tokens;
``end`` once): timing each token, and printing text as it arrives."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

from torch import Tensor


class Streamer(Protocol):
    """transformers' streamer protocol (``TextStreamer`` fits): ``put`` gets the prompt (B, T) first,
    then each step's new tokens (B,), on the CPU; ``end`` is called once generation stops."""

    def put(self, value: Tensor) -> None: ...

    def end(self) -> None: ...


class TimingStreamer:
    """A generate() streamer (transformers' protocol) that timestamps every step's tokens.

    ``put`` gets the prompt first, then each new token; decode tokens/s is measured from the first
    new token to the last, so it leaves the prefill out."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def new_tokens(self) -> int:
        return len(self.times)

    def decode_tokens_per_s(self, skip: int = 0) -> float:
        """Tokens after the first (and ``skip`` more), per second of decoding; nan if too few.

        ``skip=1`` leaves out the first decode step, which is where compile=True compiles."""
        times = self.times[skip:]
        if len(times) < 2:
            return float("nan")
        return (len(times) - 1) / (times[-1] - times[0])


class TextStreamPrinter(TimingStreamer):
    """Prints the new text of a single sequence as its tokens arrive.

    Each step decodes the tokens generated so far and prints what was not printed yet; text ending
    in U+FFFD is held back, since byte-level BPE splits a multi-byte character over tokens."""

    def __init__(self, tokenizer: Any, file: TextIO | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.file = sys.stdout if file is None else file  # looked up now: tests swap sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def put(self, value: Tensor) -> None:
        was_prompt = not self.prompt_seen
        super().put(value)
        if was_prompt:
            return
        self.tokens.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._print(text)

    def end(self) -> None:
        self._print(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        print(file=self.file, flush=True)

    def _print(self, text: str) -> None:
        if len(text) > self.printed:
            print(text[self.printed :], end="", file=self.file, flush=True)
            self.printed = len(text)
