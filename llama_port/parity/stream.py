"""Layer-streaming parity: the report ``compare`` makes, measured one decoder layer at a time.

Two (or, in low precision, three) models run side by side, layer by layer: for each decoder
layer, each side in turn reads that layer's weights, runs it on its own hidden state (the carried
error), ours also on the reference's (the local error), and drops the weights. Peak memory is
the embedding or the head of each side, about two decoder layers and the activations, not two
whole models.

Each side is a :class:`LayerStream`: :class:`PortLayers` here is llama_port's (our model's modules,
our loader's readers and checks); ``reference.ReferenceLayers`` is transformers' own modules with
the weights read by the safetensors library (or transformers' GGUF reader), never by our loader.

The figures are the ones ``compare`` reports for the same batch, bit for bit: the same modules
run on the same inputs in the same order. Greedy generation needs every layer per token, so it
runs only when asked (``max_new_tokens``), without a KV cache: every new token streams the whole
prefix through every layer of each model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import Tensor, nn

from ..attention import get_backend
from ..attention.masks import mask_for_forward
from ..checkpoints import CheckpointSource, MissingKeysError, UnexpectedKeysError
from ..checkpoints.errors import format_keys
from ..checkpoints.loading import (
    build_meta_model,
    iter_parameter_tensors,
    settle_tied_head,
    tied_aliases,
)
from ..checkpoints.names import layer_index
from ..dtypes import DTYPES
from ..generation.stopping import eos_token_ids, until_eos
from ..modeling import LlamaForCausalLM
from .compare import (
    Outcome,
    ParityReport,
    build_report,
    errors_against_fp32,
    logit_metrics,
    pass_rule,
    prepare_batch,
    probe_diff,
)

EMBEDDING, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

Layer = Callable[[Tensor], Tensor]  # hidden (B, T, C) -> (B, T, C)


class LayerStream(Protocol):
    """One model of a streamed comparison. ``start`` embeds a batch and sets up its mask and rotary
    tables; ``layer(i)`` holds decoder layer i's weights while its context is open; ``norm`` and
    ``head`` finish. read_seconds: time spent reading (and converting) weights so far."""

    num_hidden_layers: int
    eos_token_id: int | list[int] | None
    device: torch.device
    backend: str
    read_seconds: float

    def start(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor: ...

    def layer(self, i: int) -> AbstractContextManager[Layer]: ...

    def norm(self, hidden: Tensor) -> Tensor: ...

    def head(self, hidden: Tensor) -> Tensor: ...

    def close(self) -> None: ...


@torch.no_grad()
def compare_streaming(
    ours: LayerStream,
    reference: LayerStream,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    dtype: str,
    generation_input_ids: Tensor | None = None,
    max_new_tokens: int = 0,
    atol: float | None = None,
    ratio: float | None = None,
    kl_limit: float | None = None,
    allow_token_mismatch: bool = False,
    reference_fp32: LayerStream | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ParityReport:
    """``compare``'s report (same rules, same figures) with ``ours`` and ``reference`` streamed.

    Arguments as compare's; max_new_tokens defaults to 0 (greedy generation skipped, with a note).
    progress: called with (layers done, layers) after each decoder layer.
    """
    rule = pass_rule(dtype, atol, ratio, reference_fp32 is not None, kl_limit)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 0")
    if ours.num_hidden_layers != reference.num_hidden_layers:
        raise ValueError(
            f"ours has {ours.num_hidden_layers} decoder layers, the reference {reference.num_hidden_layers}"
        )
    input_ids, attention_mask, real, position_ids = prepare_batch(input_ids, attention_mask, ours.device)
    chains = [ours, reference] + ([reference_fp32] if reference_fp32 is not None else [])

    started = time.perf_counter()
    states = [chain.start(input_ids, attention_mask, position_ids) for chain in chains]  # (B, T, C) each
    per_layer = [probe_diff("embed_tokens", None, *states[:2], None, _fp32(states), real, rule)]
    layers = ours.num_hidden_layers
    for i in range(layers):
        outputs, local = [], None
        for k, (chain, hidden) in enumerate(zip(chains, states)):  # one side's layer in memory at a time
            with chain.layer(i) as layer:
                outputs.append(layer(hidden))
                if k == 0:
                    local = _local(layer, states)
        per_layer.append(probe_diff(f"layers.{i}", i, *outputs[:2], local, _fp32(outputs), real, rule))
        states = outputs
        if progress is not None:
            progress(i + 1, layers)
    normed = [chain.norm(h) for chain, h in zip(chains, states)]
    per_layer.append(probe_diff("norm", None, *normed[:2], _local(ours.norm, states), _fp32(normed), real, rule))
    logits = [chain.head(h) for chain, h in zip(chains, normed)]  # (B, T, V) each
    per_layer.append(probe_diff("lm_head", None, *logits[:2], _local(ours.head, normed), _fp32(logits), real, rule))
    metrics = logit_metrics(logits[0][real], logits[1][real])
    ours_error = reference_error = None
    if reference_fp32 is not None:
        ours_error, reference_error = errors_against_fp32(*logits, real)
    del states, normed, logits
    read = sum(chain.read_seconds for chain in chains)
    timings = {"read": read, "compute": time.perf_counter() - started - read}

    ours_tokens: list[int] = []
    reference_tokens: list[int] = []
    notes = []
    if max_new_tokens > 0:
        started = time.perf_counter()
        prompt = input_ids[:1, real[0]] if generation_input_ids is None else generation_input_ids.to(ours.device)
        ours_tokens = greedy_streamed(ours, prompt, max_new_tokens)
        reference_tokens = greedy_streamed(reference, prompt, max_new_tokens)
        timings["greedy"] = time.perf_counter() - started
    else:
        notes.append(
            "greedy generation skipped: streamed, each token streams every layer of both models "
            "(max_new_tokens; --greedy-tokens N in llama-port parity)"
        )
    for chain in chains:
        chain.close()
    if reference.backend != ours.backend:
        notes.append(f"attention backends differ: ours {ours.backend!r}, reference {reference.backend!r}")
    outcome = Outcome(ours_error, reference_error, ours_tokens, reference_tokens, max_new_tokens > 0)
    return build_report(
        rule, metrics, per_layer, outcome, allow_token_mismatch, num_positions=int(real.sum()),
        device=str(ours.device), backend=ours.backend, weights_digest=None, notes=notes, timings=timings,
        mode="stream", streamed=True,
    )


def _local(ours: Layer, inputs: list[Tensor]) -> Tensor | None:
    """Our module on the reference's input; None when our input is the reference's already."""
    return None if torch.equal(inputs[0], inputs[1]) else ours(inputs[1])


def _fp32(states: list[Tensor]) -> Tensor | None:
    return states[2] if len(states) > 2 else None


def greedy_streamed(chain: LayerStream, prompt: Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of prompt (1, T), without a cache: each new token runs the whole
    sequence through every streamed layer; stops after an end-of-sequence id."""
    eos = eos_token_ids(chain.eos_token_id)
    ids = prompt
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        ids, mask, _, positions = prepare_batch(ids, None, chain.device)
        hidden = chain.start(ids, mask, positions)
        for i in range(chain.num_hidden_layers):
            with chain.layer(i) as layer:
                hidden = layer(hidden)
        token = int(chain.head(chain.norm(hidden[:, -1:]))[0, -1].argmax())
        tokens.append(token)
        if token in eos:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)  # (1, T + 1)
    return until_eos(tokens, eos)


# ------------------------------------------------------------------------------- llama_port's side
class PortLayers:
    """llama_port's side of a streamed comparison: our LlamaForCausalLM built on the meta device,
    each decoder layer's weights put in place from ``source`` when that layer runs and dropped
    after it; every tensor goes through our loader's checks (names, shapes, dtypes, missing and
    unexpected tensors, a tied head) as ``from_pretrained`` would apply them.

    dtype: a name from llama_port.dtypes.DTYPES. attn: the attention backend.
    """

    def __init__(self, source: CheckpointSource, dtype: str, device: str = "cpu", attn: str = "sdpa") -> None:
        backend = get_backend(attn)
        self.device = torch.device(device)
        if backend.check_available is not None:
            backend.check_available(self.device)
        self.model = build_meta_model(LlamaForCausalLM, source.config.copy(), DTYPES[dtype], None)
        self.model.config._attn_implementation = attn
        self.config = self.model.config
        rotary = self.model.model.rotary_emb
        rotary.inv_freq = torch.empty(0, device=self.device)
        rotary.reset_parameters()  # the frequencies on our device, as loading computes them
        self.num_hidden_layers = self.config.num_hidden_layers
        self.eos_token_id = self.config.eos_token_id
        self.backend = attn
        self.read_seconds = 0.0
        self._mask_format = backend.mask_format
        self._params = dict(self.model.named_parameters())
        self._tensors = _TensorCursor(source, self._params, tied_aliases(self.model))
        self._embedding: Tensor | None = None  # kept while the head shares it
        self._cos = self._sin = self._mask = None

    def start(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Embeddings (B, T, C); the mask and cos/sin for the layers, as LlamaModel.forward makes them."""
        inner = self.model.model
        weight = self._embedding if self._embedding is not None else self._take({EMBEDDING})[EMBEDDING]
        with _weights(self.model, {EMBEDDING: weight}):
            hidden = inner.embed_tokens(input_ids)  # (B, T, C)
        if self.config.tie_word_embeddings:
            self._embedding = weight
        B, T = input_ids.shape
        self._mask = mask_for_forward(
            self._mask_format, attention_mask, position_ids=position_ids, past_key_values=None, past_seen=0,
            batch_size=B, q_length=T, dtype=hidden.dtype, device=hidden.device,
        )
        self._cos, self._sin = inner.rotary_emb(hidden, position_ids)  # (B, T, D)
        return hidden

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[Layer]:
        prefix = f"model.layers.{i}."
        module = self.model.model.layers[i]
        names = {prefix + name for name, _ in module.named_parameters()}
        with _weights(self.model, self._take(names)):
            yield lambda hidden: module(hidden, self._cos, self._sin, self._mask, None, None)[0]

    def norm(self, hidden: Tensor) -> Tensor:
        with _weights(self.model, self._final(NORM)):
            return self.model.model.norm(hidden)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits (B, T, V); a tied head is the embedding unless the checkpoint holds a different one."""
        with _weights(self.model, {HEAD: self._final(HEAD)[HEAD]}):
            return self.model.lm_head(hidden)

    def close(self) -> None:
        """Reads the rest of the first pass, so tensors the model has no place for are refused."""
        self._tensors.finish_first_pass()

    def _final(self, name: str) -> dict[str, Tensor]:
        """The final norm's or the head's weight, kept once read (greedy generation needs them again)."""
        if name not in self._tensors.final:
            if name == HEAD and HEAD in self._tensors.aliases:
                self._tensors.final[HEAD] = self._tied_head()
            else:
                self._tensors.final[name] = self._take({name})[name]
        return {name: self._tensors.final[name]}

    def _tied_head(self) -> Tensor:
        """Settled as loading settles it: the embedding, or a head saved anyway that differs from it."""
        self._tensors.finish_first_pass()  # only a whole pass tells whether the checkpoint holds a head
        embedding = self._embedding if self._embedding is not None else self._take({EMBEDDING})[EMBEDDING]
        head = self._tensors.kept.pop(HEAD, None)
        if head is not None:
            where = self._tensors.source.file_of(HEAD)
            if settle_tied_head(HEAD, EMBEDDING, head, embedding, self.config, where) == HEAD:
                return self._convert(HEAD, head)
        return embedding

    def _take(self, names: set[str]) -> dict[str, Tensor]:
        started = time.perf_counter()
        tensors = {name: self._convert(name, tensor) for name, tensor in self._tensors.take(names).items()}
        self.read_seconds += time.perf_counter() - started
        return tensors

    def _convert(self, name: str, tensor: Tensor) -> Tensor:
        # No copy when device and dtype match: a memory-mapped tensor stays a view of its file.
        target = self._params[self._tensors.aliases.get(name, name)]
        return tensor.to(device=self.device, dtype=target.dtype).contiguous()


@contextlib.contextmanager
def _weights(model: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """``tensors`` as the parameters of those names while the context is open, then the meta ones
    back (so nothing keeps the weights alive)."""
    saved = {name: model.get_parameter(name) for name in tensors}
    for name, tensor in tensors.items():
        _set_parameter(model, name, nn.Parameter(tensor, requires_grad=False))
    try:
        yield
    finally:
        for name, param in saved.items():
            _set_parameter(model, name, param)


def _set_parameter(model: nn.Module, name: str, value: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = value


class _TensorCursor:
    """Our loader's checked tensors (loading.iter_parameter_tensors) from a source's groups, taken
    by name in any order: one pass over the groups while they come in the order asked for, a new
    pass when a tensor asked for was passed by (safetensors files hold layers in name order: 0, 1,
    10, 11, ..., 2, ...). Other layers' tensors passed by are dropped (a safetensors group is a
    view of its file, so passing one reads nothing); the embedding, final norm and head are kept
    in ``kept`` when passed by. ``final``: the norm and head once in use."""

    def __init__(self, source: CheckpointSource, params: dict[str, Tensor], aliases: dict[str, str]) -> None:
        self.source = source
        self.params = params
        self.aliases = aliases
        self.kept: dict[str, Tensor] = {}
        self.final: dict[str, Tensor] = {}
        self._unexpected: list[str] = []
        self._pass: Iterator[tuple[str, str, Tensor]] | None = None
        self._passes = 0
        self._first_pass_done = False

    def take(self, names: set[str]) -> dict[str, Tensor]:
        """{name: tensor} for our parameter ``names``; MissingKeysError when a whole pass lacks some."""
        found = {name: self.kept.pop(name) for name in names if name in self.kept}
        fresh = False  # a pass begun within this call has seen every group once it ends
        while len(found) < len(names):
            item = next(self._pass, None) if self._pass is not None else None
            if item is None:
                self._end_pass()
                if fresh:
                    missing = sorted(names - set(found))
                    raise MissingKeysError(
                        f"{self.source.root}: the checkpoint lacks {len(missing)} tensors the model needs: "
                        f"{format_keys(missing)}",
                        missing,
                    )
                self._new_pass()
                fresh = True
                continue
            name, _, tensor = item
            if name in names:
                found[name] = tensor
            elif layer_index(name) is None and name not in self.final:
                self.kept[name] = tensor
        return found

    def finish_first_pass(self) -> None:
        """Read the first pass to its end (keeping the non-layer tensors), so its unexpected
        tensors are known (UnexpectedKeysError, as a strict load)."""
        while not self._first_pass_done:
            if self._passes == 0:
                self._new_pass()
            for name, _, tensor in self._pass:
                if layer_index(name) is None and name not in self.final:
                    self.kept[name] = tensor
            self._end_pass()

    def _new_pass(self) -> None:
        # Unexpected names are collected on the first pass only; later passes see the same ones.
        unexpected = self._unexpected if self._passes == 0 else []
        self._pass = iter(iter_parameter_tensors(self.source, self.params, self.aliases, unexpected, "streaming", False))
        self._passes += 1

    def _end_pass(self) -> None:
        if self._passes == 1 and not self._first_pass_done:
            self._first_pass_done = True
            if self._unexpected:
                raise UnexpectedKeysError(
                    f"{self.source.file_of(self._unexpected[0])}: {len(self._unexpected)} tensors the model has no "
                    f"place for: {format_keys(self._unexpected)}",
                    self._unexpected,
                )
        self._pass = None
