"""Parity: does llama_port reproduce transformers' LlamaForCausalLM on a checkpoint, and if not,
where does it start to diverge?

``compare(ours, reference, input_ids, attention_mask)`` runs both models on the same left-padded
batch and measures, over the real (non-pad) positions only:

- logits: max and mean |ours - reference|, top-1 agreement (same argmax), top-5 agreement (mean
  overlap of the two top-5 sets, |A & B| / 5), and the largest per-token KL(reference || ours),
  computed in float64 from log_softmax;
- per layer: max and mean |diff| of the hidden state after ``embed_tokens``, after each decoder
  layer ``layers.i`` (its output before the final norm: captured with forward hooks on
  ``model.model.layers[i]``, which exist under the same names on both sides), after the final
  ``norm``, and the ``lm_head`` logits. Two errors per probe: the carried one (``max_abs_diff``,
  also ``carried_max_abs_diff``) runs each model on its own output, the drift a user sees; the
  local one (``local_max_abs_diff``) runs our module on the reference's input to it (the forward
  replayed with the reference's hidden state), so it is the error that module adds by itself;
- greedy generation: both models extend one prompt by ``max_new_tokens`` tokens with
  do_sample=False (each stops at EOS); the first position where the continuations differ.

First divergent layer (the rule): the first entry whose local error exceeds its threshold: a
module that is wrong on correct input, named even when the carried drift is already large. When
no module is wrong by itself (or no local errors were measured), the carried errors decide:
walking the entries in order, the first whose max |diff| exceeds its threshold AND is more than
10x the previous entry's (for the embedding the previous is taken as 0; an exact 0 before counts
as "~0"), which is where an error enters rather than where an inherited one keeps growing; when
the error grows gradually and no entry jumps, the first entry over its threshold.
``first_divergent_layer`` is the decoder-layer index of that entry (None when it is
``embed_tokens``, ``norm`` or ``lm_head``, or when nothing diverges); ``first_divergent_name``
always names it.

Pass rules. float32: max |logit diff| <= atol (default 1e-4). bfloat16/float16: the reference's
own rounding error is the yardstick (as flash-attn's model tests judge a low-precision port):
with ``reference_fp32`` (the reference loaded in float32) ours_err = max|ours_lp - ref_fp32| and
ref_err = max|ref_lp - ref_fp32| over the logits, pass if ours_err <= ratio * ref_err (default
ratio 2.0); per-layer thresholds are likewise ratio x the reference's own error at that layer.
``kl_limit``, when given, also bounds the largest KL (and, without an explicit atol, replaces the
float32 atol: the yardstick for a quantised checkpoint). In every dtype the greedy tokens must be
identical unless ``allow_token_mismatch``.

The reference model is loaded by parity/reference.py (transformers' own loader), the inputs built
by parity/inputs.py, the report drawn by parity/report.py; parity/stream.py measures the same
report one decoder layer at a time, and parity/against.py compares two checkpoints of one model;
``llama-port parity`` (cli/parity.py) puts them together.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dtypes import COMPUTE_DTYPES, LOW_PRECISION_DTYPES, dtype_name
from ..generation.stopping import eos_token_ids, until_eos
from ..modeling import LlamaPreTrainedModel

DEFAULT_ATOL = 1e-4  # float32: max |logit diff|
DEFAULT_RATIO = 2.0  # bfloat16 / float16: our error / the reference's own error
JUMP_FACTOR = 10.0  # an entry "jumps" when its max diff is > 10x the previous entry's
WEIGHTS_HASH_METHOD = "sha256 over our loaded state_dict: each name (utf-8) then its tensor bytes, in sorted name order"


# ---------------------------------------------------------------------------------------- report
@dataclass
class LayerDiff:
    """One probe point. layer: decoder-layer index, None for embed_tokens / norm / lm_head.

    max_abs_diff / mean_abs_diff: the carried error, each model run on its own output (the drift a
    user sees); carried_max_abs_diff repeats max_abs_diff under its explicit name.
    local_max_abs_diff: our module run on the reference's input to it (None: not measured).
    threshold: the bound this entry is judged against by the divergence rule."""

    layer: int | None
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    threshold: float
    local_max_abs_diff: float | None = None
    carried_max_abs_diff: float | None = None

    def __post_init__(self) -> None:
        if self.carried_max_abs_diff is None:
            self.carried_max_abs_diff = self.max_abs_diff


@dataclass
class ParityReport:
    """What ``compare`` measured; ``to_dict()`` is the ``--json`` document (same field names).

    Logit figures are over the real (attention_mask == 1) positions of the batch. ours_error and
    reference_error: max |logits - reference_fp32 logits| of ours and of the reference (low
    precision with a float32 reference only, else None). first_token_mismatch: index into the
    generated tokens where the continuations first differ (one ending early counts), None when
    they match. failures: the reasons ``passed`` is False, one line each. mode: "whole" (both
    models in memory), "stream" (one decoder layer at a time) or "against" (two checkpoints of one
    model; ``streamed`` says how). kl_limit: the bound on kl_max, when one was given. quantize:
    how ours was quantized ("int8"; None: not). timings: seconds per phase.
    """

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    top5_agreement: float
    kl_max: float
    first_divergent_layer: int | None
    first_divergent_name: str | None
    per_layer: list[LayerDiff]
    greedy_match: bool | None
    first_token_mismatch: int | None
    passed: bool
    failures: list[str]
    dtype: str
    device: str
    backend: str
    atol: float | None
    ratio: float | None
    allow_token_mismatch: bool
    ours_error: float | None
    reference_error: float | None
    num_positions: int
    ours_tokens: list[int]
    reference_tokens: list[int]
    torch_version: str
    transformers_version: str | None
    llama_port_version: str
    weights_sha256: str | None
    weights_hash_method: str
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)
    mode: str = "whole"
    streamed: bool = False
    against: str | None = None
    kl_limit: float | None = None
    quantize: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN / inf figures become None so the document stays strict JSON."""
        return _finite(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- rules
@dataclass
class Rule:
    """The pass rule a comparison applies: float32 by atol; low precision by ratio against a
    float32 reference (and atol when given); kl_limit bounds the largest KL when given."""

    dtype: str
    atol: float | None
    ratio: float | None
    kl_limit: float | None = None

    @property
    def layer_threshold(self) -> float:
        """A probe's bound when no float32 reference sets it: atol, or none under a KL-only rule."""
        return math.inf if self.atol is None else self.atol


def pass_rule(
    dtype: str, atol: float | None, ratio: float | None, has_fp32_reference: bool, kl_limit: float | None = None
) -> Rule:
    """The rule for ``dtype`` (see the module docstring); ValueError for an unknown dtype or a low
    precision with no yardstick (no float32 reference, atol or kl_limit)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}")
    if dtype not in LOW_PRECISION_DTYPES:
        # The reference already is the float32 run: judged by atol (and kl_limit when given).
        default = DEFAULT_ATOL if kl_limit is None else None
        return Rule(dtype, default if atol is None else atol, None, kl_limit)
    if not has_fp32_reference and atol is None and kl_limit is None:
        raise ValueError(f"dtype={dtype!r} needs reference_fp32 (the ratio rule), an explicit atol or a kl_limit")
    if not has_fp32_reference:
        return Rule(dtype, atol, None, kl_limit)
    return Rule(dtype, atol, DEFAULT_RATIO if ratio is None else ratio, kl_limit)


@dataclass
class _LogitMetrics:
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    top5_agreement: float
    kl_max: float


def logit_metrics(ours: Tensor, reference: Tensor) -> _LogitMetrics:
    """Agreement of two models' logits (N, V) at the same N positions: max and mean |diff|, top-1
    agreement, mean top-5 overlap |A & B| / 5, and the largest per-position KL(reference || ours)
    in float64 (the KL of near-equal models is ~1e-12)."""
    ours, reference = ours.float(), reference.float()
    diff = (ours - reference).abs()
    top1 = float((ours.argmax(-1) == reference.argmax(-1)).float().mean())
    k = min(5, ours.shape[-1])
    top_ours, top_ref = ours.topk(k, dim=-1).indices, reference.topk(k, dim=-1).indices  # (N, k)
    overlap = (top_ours[:, :, None] == top_ref[:, None, :]).any(-1).float().sum(-1) / k  # (N,)
    ref_logp = F.log_softmax(reference.double(), dim=-1)
    ours_logp = F.log_softmax(ours.double(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - ours_logp)).sum(-1)  # (N,) KL(reference || ours)
    return _LogitMetrics(_max(diff), float(diff.mean()), top1, float(overlap.mean()), _max(kl))


def probe_diff(
    name: str,
    layer: int | None,
    ours: Tensor,
    reference: Tensor,
    local: Tensor | None,
    fp32: Tensor | None,
    real: Tensor,
    rule: Rule,
) -> LayerDiff:
    """One probe's entry over the real positions of (B, T, C) states: carried |ours - reference|;
    local |local - reference|, where ``local`` is our module's output on the reference's input
    (None: our input was the reference's already, so local = carried); the threshold is the
    rule's, or ratio x |reference - fp32| with a float32 reference's state ``fp32``."""
    ref = reference[real].float()  # (N, C)
    d = (ours[real].float() - ref).abs()
    local_max = _max(d) if local is None else _max((local[real].float() - ref).abs())
    threshold = rule.layer_threshold if fp32 is None else rule.ratio * _max((ref - fp32[real].float()).abs())
    return LayerDiff(layer, name, _max(d), float(d.mean()), threshold, local_max)


def prepare_batch(input_ids: Tensor, attention_mask: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, real, position_ids), each (B, T) on ``device``: the mask
    defaults to all ones, real is it as bool, positions are ``mask.cumsum(-1) - 1`` as generate()
    computes them for left padding. ValueError for a batch that is not (B, T) or has no real token."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    real = attention_mask.bool()
    if not real.any():
        raise ValueError("attention_mask has no real (1) positions to compare")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, real, position_ids


# --------------------------------------------------------------------------------------- compare
@torch.no_grad()
def compare(
    ours: nn.Module,
    reference: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    generation_input_ids: Tensor | None = None,
    max_new_tokens: int = 32,
    dtype: str | None = None,
    atol: float | None = None,
    ratio: float | None = None,
    kl_limit: float | None = None,
    allow_token_mismatch: bool = False,
    reference_fp32: nn.Module | None = None,
    hash_weights: bool = True,
) -> ParityReport:
    """Run ``ours`` (a llama_port LlamaForCausalLM) and ``reference`` (transformers', or another
    llama_port model) on the same batch and judge parity (rules in the module docstring).

    input_ids, attention_mask: (B, T); the mask is 1 for real tokens, 0 for (left) padding;
        position ids are ``mask.cumsum(-1) - 1`` for both models, as generate() computes them.
    generation_input_ids: (1, T') prompt for the greedy check (default: row 0's real tokens);
        max_new_tokens=0 skips the check (greedy_match None).
    dtype: the label reported and the rule chosen ("float32", "bfloat16", "float16"); default: the
        dtype of ours' parameters.
    atol: float32 bound on max |logit diff| (default 1e-4); in low precision an extra bound, and
        the only one when no ``reference_fp32`` is given.
    ratio: low-precision bound on ours_err / ref_err (default 2.0); needs ``reference_fp32``.
    kl_limit: bound on the largest KL(reference || ours).
    reference_fp32: the reference loaded in float32, the yardstick for bfloat16 / float16.
    hash_weights: record weights_sha256 over ours' state dict (see WEIGHTS_HASH_METHOD).
    """
    rule = pass_rule(dtype or dtype_name(_param_dtype(ours)), atol, ratio, reference_fp32 is not None, kl_limit)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 0")
    device = _param_device(ours)
    input_ids, attention_mask, real, position_ids = prepare_batch(input_ids, attention_mask, device)

    started = time.perf_counter()
    ours_logits, ours_states, calls = _forward_with_probes(ours, input_ids, attention_mask, position_ids)
    ref_logits, ref_states, _ = _forward_with_probes(reference, input_ids, attention_mask, position_ids)
    local = _local_states(calls, ours_states, ref_states)
    ours_error = reference_error = None
    fp32 = {}
    if reference_fp32 is not None:
        fp32_logits, fp32_states, _ = _forward_with_probes(reference_fp32, input_ids, attention_mask, position_ids)
        fp32 = {name: h for name, _, h in fp32_states}
        ours_error, reference_error = errors_against_fp32(ours_logits, ref_logits, fp32_logits, real)
    per_layer = [
        probe_diff(name, layer, ours_h, ref_h, local.get(name), fp32.get(name), real, rule)
        for (name, layer, ours_h), (_, _, ref_h) in zip(ours_states, ref_states, strict=True)
    ]
    metrics = logit_metrics(ours_logits[real], ref_logits[real])
    timings = {"forward": time.perf_counter() - started}

    ours_tokens: list[int] = []
    reference_tokens: list[int] = []
    if max_new_tokens > 0:
        started = time.perf_counter()
        if generation_input_ids is None:
            generation_input_ids = input_ids[:1, real[0]]  # (1, T') row 0 without its padding
        generation_input_ids = generation_input_ids.to(device)
        ours_tokens = _greedy(ours, generation_input_ids, max_new_tokens)
        reference_tokens = _greedy(reference, generation_input_ids, max_new_tokens)
        timings["greedy"] = time.perf_counter() - started
    notes = []
    backend = str(getattr(ours, "attn_implementation", "?"))
    ref_backend = getattr(getattr(reference, "config", None), "_attn_implementation", None)
    if ref_backend is not None and ref_backend != backend:
        notes.append(f"attention backends differ: ours {backend!r}, reference {ref_backend!r}")
    started = time.perf_counter()
    digest = weights_sha256(ours) if hash_weights else None
    if hash_weights:
        timings["hash"] = time.perf_counter() - started
    return build_report(
        rule, metrics, per_layer, Outcome(ours_error, reference_error, ours_tokens, reference_tokens, max_new_tokens > 0),
        allow_token_mismatch, num_positions=int(real.sum()), device=str(device), backend=backend,
        weights_digest=digest, notes=notes, timings=timings,
    )


def errors_against_fp32(ours: Tensor, reference: Tensor, fp32: Tensor, real: Tensor) -> tuple[float, float]:
    """(max |ours - fp32|, max |reference - fp32|) over the real positions of (B, T, V) logits."""
    fp32_real = fp32[real].float()
    return _max((ours[real].float() - fp32_real).abs()), _max((reference[real].float() - fp32_real).abs())


@dataclass
class Outcome:
    """What a comparison measured besides logits and probes: the low-precision errors against a
    float32 reference (None without one) and the greedy tokens (``greedy_ran``: asked for)."""

    ours_error: float | None
    reference_error: float | None
    ours_tokens: list[int]
    reference_tokens: list[int]
    greedy_ran: bool


def build_report(
    rule: Rule,
    metrics: _LogitMetrics,
    per_layer: list[LayerDiff],
    outcome: Outcome,
    allow_token_mismatch: bool,
    *,
    num_positions: int,
    device: str,
    backend: str,
    weights_digest: str | None,
    notes: list[str],
    timings: dict[str, float],
    mode: str = "whole",
    streamed: bool = False,
) -> ParityReport:
    """The ParityReport for what a comparison measured: the verdict, the divergent layer, versions."""
    first_token_mismatch = greedy_match = None
    if outcome.greedy_ran:
        first_token_mismatch = _first_mismatch(outcome.ours_tokens, outcome.reference_tokens)
        greedy_match = first_token_mismatch is None
    failures, verdict_notes = _verdict(rule, metrics, outcome, first_token_mismatch, allow_token_mismatch)
    divergent = first_divergent(per_layer)
    transformers = sys.modules.get("transformers")
    from .. import __version__

    return ParityReport(
        max_abs_diff=metrics.max_abs_diff,
        mean_abs_diff=metrics.mean_abs_diff,
        top1_agreement=metrics.top1_agreement,
        top5_agreement=metrics.top5_agreement,
        kl_max=metrics.kl_max,
        first_divergent_layer=None if divergent is None else divergent.layer,
        first_divergent_name=None if divergent is None else divergent.name,
        per_layer=per_layer,
        greedy_match=greedy_match,
        first_token_mismatch=first_token_mismatch,
        passed=not failures,
        failures=failures,
        dtype=rule.dtype,
        device=device,
        backend=backend,
        atol=rule.atol,
        ratio=rule.ratio,
        allow_token_mismatch=allow_token_mismatch,
        ours_error=outcome.ours_error,
        reference_error=outcome.reference_error,
        num_positions=num_positions,
        ours_tokens=outcome.ours_tokens,
        reference_tokens=outcome.reference_tokens,
        torch_version=torch.__version__,
        transformers_version=None if transformers is None else transformers.__version__,
        llama_port_version=__version__,
        weights_sha256=weights_digest,
        weights_hash_method=WEIGHTS_HASH_METHOD,
        notes=notes + verdict_notes,
        mode=mode,
        streamed=streamed,
        kl_limit=rule.kl_limit,
        timings=timings,
    )


def _verdict(
    rule: Rule,
    metrics: _LogitMetrics,
    outcome: Outcome,
    first_token_mismatch: int | None,
    allow_token_mismatch: bool,
) -> tuple[list[str], list[str]]:
    """(failures, notes): one line per broken rule; an allowed token mismatch is a note."""
    failures: list[str] = []
    notes: list[str] = []
    ours_error, reference_error = outcome.ours_error, outcome.reference_error
    if rule.ratio is not None and not ours_error <= rule.ratio * reference_error:
        failures.append(
            f"our logit error against the float32 reference {ours_error:.3e} > {rule.ratio:g} x "
            f"the reference's own {reference_error:.3e}"
        )
    if rule.atol is not None and not metrics.max_abs_diff <= rule.atol:
        failures.append(f"max |logit diff| {metrics.max_abs_diff:.3e} > atol {rule.atol:.1e}")
    if rule.kl_limit is not None and not metrics.kl_max <= rule.kl_limit:
        failures.append(f"max KL(reference || ours) {metrics.kl_max:.3e} > kl_max {rule.kl_limit:.1e}")
    if first_token_mismatch is not None:
        message = (
            f"greedy generations differ from token {first_token_mismatch} "
            f"(ours {_token_at(outcome.ours_tokens, first_token_mismatch)}, "
            f"reference {_token_at(outcome.reference_tokens, first_token_mismatch)})"
        )
        if allow_token_mismatch:
            notes.append(message + "; allowed by allow_token_mismatch")
        else:
            failures.append(message)
    return failures, notes


def first_divergent(per_layer: Sequence[LayerDiff]) -> LayerDiff | None:
    """The entry where the divergence starts (the rule in the module docstring), or None."""
    for entry in per_layer:
        if entry.local_max_abs_diff is not None and _over(entry.local_max_abs_diff, entry.threshold):
            return entry  # wrong on the reference's own input: the error enters here
    previous = 0.0
    for entry in per_layer:
        if exceeds_threshold(entry) and entry.max_abs_diff > JUMP_FACTOR * previous:
            return entry
        previous = entry.max_abs_diff
    # No jump: the error grew gradually; name where it first crossed the threshold.
    return next((entry for entry in per_layer if exceeds_threshold(entry)), None)


def exceeds_threshold(entry: LayerDiff) -> bool:
    """The carried error over the entry's threshold."""
    return _over(entry.max_abs_diff, entry.threshold)


def _over(value: float, threshold: float) -> bool:
    # NaN compares False everywhere; a NaN entry is over any threshold.
    return math.isnan(value) or value > threshold


def weights_sha256(model: nn.Module) -> str:
    """Hex digest per WEIGHTS_HASH_METHOD (tied tensors appear under each of their names)."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        if hasattr(tensor, "full_tensor"):  # a tensor-parallel DTensor: the whole weight, as one process holds it
            tensor = tensor.full_tensor()
        tensor = tensor.to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # raw bytes, any dtype
    return digest.hexdigest()


# What a forward pre-hook saw of a probe's call: the arguments after the hidden state, and the keywords.
_Call = tuple[nn.Module, tuple, dict]


def _forward_with_probes(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
) -> tuple[Tensor, list[tuple[str, int | None, Tensor]], dict[str, _Call]]:
    """Logits (B, T, V), [(name, layer, hidden (B, T, C))] for embed_tokens, each decoder layer's
    output, the final norm and lm_head, captured by forward hooks on modules that have the same
    names in llama_port and transformers, and each probe's call after the embedding (to replay it
    on another input)."""
    inner = model.model
    probes: list[tuple[str, int | None, nn.Module]] = [("embed_tokens", None, inner.embed_tokens)]
    probes += [(f"layers.{i}", i, layer) for i, layer in enumerate(inner.layers)]
    probes += [("norm", None, inner.norm), ("lm_head", None, model.lm_head)]
    captured: dict[str, Tensor] = {}
    calls: dict[str, _Call] = {}

    def hook(name: str):
        def capture(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            # Our decoder layers return (hidden, attn_weights); transformers' the hidden alone.
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return capture

    def pre_hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[name] = (module, args[1:], kwargs)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, _, module in probes]
    handles += [module.register_forward_pre_hook(pre_hook(name), with_kwargs=True) for name, _, module in probes[1:]]
    try:
        logits = model(
            input_ids=input_ids.to(_param_device(model)),
            attention_mask=attention_mask.to(_param_device(model)),
            position_ids=position_ids.to(_param_device(model)),
            use_cache=False,
        ).logits
    finally:
        for handle in handles:
            handle.remove()
    device = input_ids.device
    return logits.to(device), [(name, layer, captured[name].to(device)) for name, layer, _ in probes], calls


def _local_states(
    calls: dict[str, _Call],
    ours_states: list[tuple[str, int | None, Tensor]],
    ref_states: list[tuple[str, int | None, Tensor]],
) -> dict[str, Tensor]:
    """{probe: our module's output on the reference's input to it} (each probe's input is the
    previous probe's output), replaying our recorded call; probes whose two inputs are already
    equal are left out, their local output being the carried one."""
    local = {}
    for k in range(1, len(ours_states)):
        name, ours_in, ref_in = ours_states[k][0], ours_states[k - 1][2], ref_states[k - 1][2]
        if torch.equal(ours_in, ref_in):
            continue
        module, args, kwargs = calls[name]
        output = module(ref_in.to(_param_device(module)), *args, **kwargs)
        local[name] = (output[0] if isinstance(output, tuple) else output).to(ref_in.device)
    return local


def _greedy(model: nn.Module, prompt: Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation by the model's own library: llama_port's generate() or transformers'."""
    if isinstance(model, LlamaPreTrainedModel):
        sequences = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)  # (1, T + N)
        return until_eos(sequences[0, prompt.shape[1] :].tolist(), eos_token_ids(model.config.eos_token_id))
    from transformers import GenerationConfig

    eos = sorted(eos_token_ids(getattr(model.config, "eos_token_id", None)))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None, pad_token_id=pad
    )
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return until_eos(output[0, prompt.shape[1] :].tolist(), eos)


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _token_at(tokens: list[int], i: int | None) -> str:
    return str(tokens[i]) if i is not None and i < len(tokens) else "end"


def _max(t: Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    if torch.isnan(t).any():
        return math.nan
    return float(t.max())


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
