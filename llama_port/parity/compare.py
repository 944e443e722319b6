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
  ``norm``, and the ``lm_head`` logits;
- greedy generation: both models extend one prompt by ``max_new_tokens`` tokens with
  do_sample=False (each stops at EOS); the first position where the continuations differ.

First divergent layer (the rule): walking the per-layer entries in order, the first entry whose
max |diff| exceeds that entry's threshold AND is more than 10x the previous entry's max |diff|
(for the embedding the previous is taken as 0; an exact 0 before counts as "~0"). That is where
an error enters rather than where an inherited one keeps growing: perturbing one weight of layer k
makes ``layers.k`` jump from float noise to O(weight change). When the error grows gradually and
no entry jumps, the first entry over its threshold is named instead. ``first_divergent_layer`` is
the decoder-layer index of that entry (None when it is ``embed_tokens``, ``norm`` or ``lm_head``,
or when nothing diverges); ``first_divergent_name`` always names it.

Pass rules. float32: max |logit diff| <= atol (default 1e-4). bfloat16/float16: the reference's
own rounding error is the yardstick (as flash-attn's model tests judge a low-precision port):
with ``reference_fp32`` (the reference loaded in float32) ours_err = max|ours_lp - ref_fp32| and
ref_err = max|ref_lp - ref_fp32| over the logits, pass if ours_err <= ratio * ref_err (default
ratio 2.0); per-layer thresholds are likewise ratio x the reference's own error at that layer.
In every dtype the greedy tokens must be identical unless ``allow_token_mismatch``.

The reference model is loaded by parity/reference.py (transformers' own loader), the inputs built
by parity/inputs.py, the report drawn by parity/report.py; ``llama-port parity`` (cli/parity.py)
puts them together.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dtypes import COMPUTE_DTYPES, LOW_PRECISION_DTYPES, dtype_name
from ..generation.stopping import eos_token_ids, until_eos

DEFAULT_ATOL = 1e-4  # float32: max |logit diff|
DEFAULT_RATIO = 2.0  # bfloat16 / float16: our error / the reference's own error
JUMP_FACTOR = 10.0  # an entry "jumps" when its max diff is > 10x the previous entry's
WEIGHTS_HASH_METHOD = "sha256 over our loaded state_dict: each name (utf-8) then its tensor bytes, in sorted name order"


# ---------------------------------------------------------------------------------------- report
@dataclass
class LayerDiff:
    """One probe point. layer: decoder-layer index, None for embed_tokens / norm / lm_head.
    threshold: the bound this entry is judged against by the divergence rule."""

    layer: int | None
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    threshold: float


@dataclass
class ParityReport:
    """What ``compare`` measured; ``to_dict()`` is the ``--json`` document (same field names).

    Logit figures are over the real (attention_mask == 1) positions of the batch. ours_error and
    reference_error: max |logits - reference_fp32 logits| of ours and of the reference (low
    precision with a float32 reference only, else None). first_token_mismatch: index into the
    generated tokens where the continuations first differ (one ending early counts), None when
    they match. failures: the reasons ``passed`` is False, one line each.
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


# --------------------------------------------------------------------------------------- compare
@dataclass
class _Rule:
    """The pass rule compare() applies: float32 by atol; low precision by ratio against a float32
    reference (and atol when given)."""

    dtype: str
    atol: float | None
    ratio: float | None
    reference_fp32: nn.Module | None


def _rule(dtype: str, atol: float | None, ratio: float | None, reference_fp32: nn.Module | None) -> _Rule:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}")
    if dtype not in LOW_PRECISION_DTYPES:
        # The reference already is the float32 run: judged by atol alone.
        return _Rule(dtype, DEFAULT_ATOL if atol is None else atol, None, None)
    if reference_fp32 is None and atol is None:
        raise ValueError(f"dtype={dtype!r} needs reference_fp32 (the ratio rule) or an explicit atol")
    if reference_fp32 is None:
        return _Rule(dtype, atol, None, None)
    return _Rule(dtype, atol, DEFAULT_RATIO if ratio is None else ratio, reference_fp32)


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


def _per_layer(
    ours_states: list[tuple[str, int | None, Tensor]],
    ref_states: list[tuple[str, int | None, Tensor]],
    fp32_states: list[tuple[str, int | None, Tensor]] | None,
    real: Tensor,
    rule: _Rule,
) -> list[LayerDiff]:
    """One LayerDiff per probe, over the real positions; the threshold is atol in float32, else
    ratio x the reference's own error at that probe."""
    fp32 = {name: h for name, _, h in fp32_states} if fp32_states is not None else None
    per_layer: list[LayerDiff] = []
    for (name, layer, ours_h), (_, _, ref_h) in zip(ours_states, ref_states, strict=True):
        d = (ours_h[real].float() - ref_h[real].float()).abs()  # (N, C)
        if fp32 is not None:
            threshold = rule.ratio * _max((ref_h[real].float() - fp32[name][real].float()).abs())
        else:
            threshold = rule.atol
        per_layer.append(LayerDiff(layer, name, _max(d), float(d.mean()), threshold))
    return per_layer


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
    allow_token_mismatch: bool = False,
    reference_fp32: nn.Module | None = None,
    hash_weights: bool = True,
) -> ParityReport:
    """Run ``ours`` (a llama_port LlamaForCausalLM) and ``reference`` (transformers') on the same
    batch and judge parity (rules in the module docstring).

    input_ids, attention_mask: (B, T); the mask is 1 for real tokens, 0 for (left) padding;
        position ids are ``mask.cumsum(-1) - 1`` for both models, as generate() computes them.
    generation_input_ids: (1, T') prompt for the greedy check (default: row 0's real tokens);
        max_new_tokens=0 skips the check (greedy_match None).
    dtype: the label reported and the rule chosen ("float32", "bfloat16", "float16"); default: the
        dtype of ours' parameters.
    atol: float32 bound on max |logit diff| (default 1e-4); in low precision an extra bound, and
        the only one when no ``reference_fp32`` is given.
    ratio: low-precision bound on ours_err / ref_err (default 2.0); needs ``reference_fp32``.
    reference_fp32: the reference loaded in float32, the yardstick for bfloat16 / float16.
    hash_weights: record weights_sha256 over ours' state dict (see WEIGHTS_HASH_METHOD).
    """
    rule = _rule(dtype or dtype_name(_param_dtype(ours)), atol, ratio, reference_fp32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 0")
    device = _param_device(ours)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    real = attention_mask.bool()  # (B, T)
    if not real.any():
        raise ValueError("attention_mask has no real (1) positions to compare")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    ours_logits, ours_states = _forward_with_probes(ours, input_ids, attention_mask, position_ids)
    ref_logits, ref_states = _forward_with_probes(reference, input_ids, attention_mask, position_ids)
    metrics = logit_metrics(ours_logits[real], ref_logits[real])
    ours_error = reference_error = fp32_states = None
    if rule.reference_fp32 is not None:
        fp32_logits, fp32_states = _forward_with_probes(rule.reference_fp32, input_ids, attention_mask, position_ids)
        fp32_real = fp32_logits[real].float()
        ours_error = _max((ours_logits[real].float() - fp32_real).abs())
        reference_error = _max((ref_logits[real].float() - fp32_real).abs())
    per_layer = _per_layer(ours_states, ref_states, fp32_states, real, rule)
    divergent = first_divergent(per_layer)

    ours_tokens: list[int] = []
    reference_tokens: list[int] = []
    if max_new_tokens > 0:
        if generation_input_ids is None:
            generation_input_ids = input_ids[:1, real[0]]  # (1, T') row 0 without its padding
        generation_input_ids = generation_input_ids.to(device)
        ours_tokens = _greedy_ours(ours, generation_input_ids, max_new_tokens)
        reference_tokens = _greedy_reference(reference, generation_input_ids, max_new_tokens)
    greedy_match = first_token_mismatch = None
    if max_new_tokens > 0:
        first_token_mismatch = _first_mismatch(ours_tokens, reference_tokens)
        greedy_match = first_token_mismatch is None

    failures, notes = _verdict(
        rule, metrics.max_abs_diff, ours_error, reference_error, ours_tokens, reference_tokens,
        first_token_mismatch, allow_token_mismatch,
    )
    backend = str(getattr(ours, "attn_implementation", "?"))
    ref_backend = getattr(getattr(reference, "config", None), "_attn_implementation", None)
    if ref_backend is not None and ref_backend != backend:
        notes.append(f"attention backends differ: ours {backend!r}, reference {ref_backend!r}")
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
        device=str(device),
        backend=backend,
        atol=rule.atol,
        ratio=rule.ratio,
        allow_token_mismatch=allow_token_mismatch,
        ours_error=ours_error,
        reference_error=reference_error,
        num_positions=int(real.sum()),
        ours_tokens=ours_tokens,
        reference_tokens=reference_tokens,
        torch_version=torch.__version__,
        transformers_version=None if transformers is None else transformers.__version__,
        llama_port_version=__version__,
        weights_sha256=weights_sha256(ours) if hash_weights else None,
        weights_hash_method=WEIGHTS_HASH_METHOD,
        notes=notes,
    )


def _verdict(
    rule: _Rule,
    max_abs_diff: float,
    ours_error: float | None,
    reference_error: float | None,
    ours_tokens: list[int],
    reference_tokens: list[int],
    first_token_mismatch: int | None,
    allow_token_mismatch: bool,
) -> tuple[list[str], list[str]]:
    """(failures, notes): one line per broken rule; an allowed token mismatch is a note."""
    failures: list[str] = []
    notes: list[str] = []
    if rule.ratio is not None and not ours_error <= rule.ratio * reference_error:
        failures.append(
            f"our logit error against the float32 reference {ours_error:.3e} > {rule.ratio:g} x "
            f"the reference's own {reference_error:.3e}"
        )
    if rule.atol is not None and not max_abs_diff <= rule.atol:
        failures.append(f"max |logit diff| {max_abs_diff:.3e} > atol {rule.atol:.1e}")
    if first_token_mismatch is not None:
        message = (
            f"greedy generations differ from token {first_token_mismatch} "
            f"(ours {_token_at(ours_tokens, first_token_mismatch)}, "
            f"reference {_token_at(reference_tokens, first_token_mismatch)})"
        )
        if allow_token_mismatch:
            notes.append(message + "; allowed by allow_token_mismatch")
        else:
            failures.append(message)
    return failures, notes

def first_divergent(per_layer: Sequence[LayerDiff]) -> LayerDiff | None:
    """The entry where the divergence starts (the rule in the module docstring), or None."""
    previous = 0.0
    for entry in per_layer:
        if exceeds_threshold(entry) and entry.max_abs_diff > JUMP_FACTOR * previous:
            return entry
        previous = entry.max_abs_diff
    # No jump: the error grew gradually; name where it first crossed the threshold.
    return next((entry for entry in per_layer if exceeds_threshold(entry)), None)


def exceeds_threshold(entry: LayerDiff) -> bool:
    # NaN compares False everywhere; a NaN entry is over any threshold.
    return math.isnan(entry.max_abs_diff) or entry.max_abs_diff > entry.threshold


def weights_sha256(model: nn.Module) -> str:
    """Hex digest per WEIGHTS_HASH_METHOD (tied tensors appear under each of their names)."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # raw bytes, any dtype
    return digest.hexdigest()


def _forward_with_probes(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
) -> tuple[Tensor, list[tuple[str, int | None, Tensor]]]:
    """Logits (B, T, V) and [(name, layer, hidden (B, T, C))] for embed_tokens, each decoder
    layer's output, the final norm and lm_head, captured by forward hooks on modules that have
    the same names in llama_port and transformers."""
    inner = model.model
    probes: list[tuple[str, int | None, nn.Module]] = [("embed_tokens", None, inner.embed_tokens)]
    probes += [(f"layers.{i}", i, layer) for i, layer in enumerate(inner.layers)]
    probes += [("norm", None, inner.norm), ("lm_head", None, model.lm_head)]
    captured: dict[str, Tensor] = {}

    def hook(name: str):
        def capture(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            # Our decoder layers return (hidden, attn_weights); transformers' the hidden alone.
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return capture

    handles = [module.register_forward_hook(hook(name)) for name, _, module in probes]
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
    return logits.to(device), [(name, layer, captured[name].to(device)) for name, layer, _ in probes]


def _greedy_ours(model: nn.Module, prompt: Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation by llama_port's own generate() (llama_port.generation)."""
    sequences = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)  # (1, T + N)
    return until_eos(sequences[0, prompt.shape[1] :].tolist(), eos_token_ids(model.config.eos_token_id))


def _greedy_reference(model: nn.Module, prompt: Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers' own generate()."""
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
