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

``run_parity_command`` is the ``llama-port parity`` CLI: it finds the checkpoint, loads it into
llama_port and into transformers' own loader (same dtype, device and attention backend), builds
the prompts and the random batch, calls ``compare`` and prints / writes the report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which green plants turn sunlight into",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_PRECISION = ("bfloat16", "float16")
DEFAULT_ATOL = 1e-4  # float32: max |logit diff|
DEFAULT_RATIO = 2.0  # bfloat16 / float16: our error / the reference's own error
JUMP_FACTOR = 10.0  # an entry "jumps" when its max diff is > 10x the previous entry's
RANDOM_BATCH_SEED = 0
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
    dtype = dtype or _dtype_name(_param_dtype(ours))
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    low_precision = dtype in LOW_PRECISION
    if low_precision and reference_fp32 is None and atol is None:
        raise ValueError(f"dtype={dtype!r} needs reference_fp32 (the ratio rule) or an explicit atol")
    if not low_precision:
        atol = DEFAULT_ATOL if atol is None else atol
        reference_fp32 = None  # the reference already is the float32 run
    if low_precision and reference_fp32 is not None:
        ratio = DEFAULT_RATIO if ratio is None else ratio
    elif low_precision:
        ratio = None
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
    notes: list[str] = []

    ours_logits, ours_states = _forward_with_probes(ours, input_ids, attention_mask, position_ids)
    ref_logits, ref_states = _forward_with_probes(reference, input_ids, attention_mask, position_ids)
    fp32_logits = fp32_states = None
    if reference_fp32 is not None:
        fp32_logits, fp32_states = _forward_with_probes(reference_fp32, input_ids, attention_mask, position_ids)

    # ---- logits over real positions
    ours_real, ref_real = ours_logits[real].float(), ref_logits[real].float()  # (N, V)
    diff = (ours_real - ref_real).abs()
    max_abs_diff, mean_abs_diff = _max(diff), float(diff.mean())
    top1 = float((ours_real.argmax(-1) == ref_real.argmax(-1)).float().mean())
    k = min(5, ours_real.shape[-1])
    top5_ours, top5_ref = ours_real.topk(k, dim=-1).indices, ref_real.topk(k, dim=-1).indices  # (N, k)
    overlap = (top5_ours[:, :, None] == top5_ref[:, None, :]).any(-1).float().sum(-1) / k  # (N,)
    top5 = float(overlap.mean())
    ref_logp = F.log_softmax(ref_real.double(), dim=-1)  # float64: KL of near-equal models is ~1e-12
    ours_logp = F.log_softmax(ours_real.double(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - ours_logp)).sum(-1)  # (N,) KL(reference || ours)
    kl_max = _max(kl)

    ours_error = reference_error = None
    if fp32_logits is not None:
        fp32_real = fp32_logits[real].float()
        ours_error = _max((ours_real - fp32_real).abs())
        reference_error = _max((ref_real - fp32_real).abs())

    # ---- per layer
    per_layer: list[LayerDiff] = []
    for (name, layer, ours_h), (_, _, ref_h) in zip(ours_states, ref_states, strict=True):
        d = (ours_h[real].float() - ref_h[real].float()).abs()  # (N, C)
        if fp32_states is not None:
            fp32_h = dict((n, h) for n, _, h in fp32_states)[name]
            threshold = ratio * _max((ref_h[real].float() - fp32_h[real].float()).abs())
        else:
            threshold = atol
        per_layer.append(LayerDiff(layer, name, _max(d), float(d.mean()), threshold))
    divergent = first_divergent(per_layer)

    # ---- greedy generation
    greedy_match = first_token_mismatch = None
    ours_tokens: list[int] = []
    reference_tokens: list[int] = []
    if max_new_tokens > 0:
        if generation_input_ids is None:
            generation_input_ids = input_ids[:1, real[0]]  # (1, T') row 0 without its padding
        generation_input_ids = generation_input_ids.to(device)
        ours_tokens = _greedy_ours(ours, generation_input_ids, max_new_tokens)
        reference_tokens = _greedy_reference(reference, generation_input_ids, max_new_tokens)
        first_token_mismatch = _first_mismatch(ours_tokens, reference_tokens)
        greedy_match = first_token_mismatch is None

    # ---- verdict
    failures: list[str] = []
    if ratio is not None and not ours_error <= ratio * reference_error:
        failures.append(
            f"our logit error against the float32 reference {ours_error:.3e} > {ratio:g} x "
            f"the reference's own {reference_error:.3e}"
        )
    if atol is not None and not max_abs_diff <= atol:
        failures.append(f"max |logit diff| {max_abs_diff:.3e} > atol {atol:.1e}")
    if greedy_match is False:
        message = (
            f"greedy generations differ from token {first_token_mismatch} "
            f"(ours {_token_at(ours_tokens, first_token_mismatch)}, "
            f"reference {_token_at(reference_tokens, first_token_mismatch)})"
        )
        if allow_token_mismatch:
            notes.append(message + "; allowed by allow_token_mismatch")
        else:
            failures.append(message)

    backend = str(getattr(ours, "attn_implementation", "?"))
    ref_backend = getattr(getattr(reference, "config", None), "_attn_implementation", None)
    if ref_backend is not None and ref_backend != backend:
        notes.append(f"attention backends differ: ours {backend!r}, reference {ref_backend!r}")
    transformers_version = None
    if "transformers" in sys.modules:
        transformers_version = sys.modules["transformers"].__version__
    from . import __version__

    return ParityReport(
        max_abs_diff=max_abs_diff,
        mean_abs_diff=mean_abs_diff,
        top1_agreement=top1,
        top5_agreement=top5,
        kl_max=kl_max,
        first_divergent_layer=None if divergent is None else divergent.layer,
        first_divergent_name=None if divergent is None else divergent.name,
        per_layer=per_layer,
        greedy_match=greedy_match,
        first_token_mismatch=first_token_mismatch,
        passed=not failures,
        failures=failures,
        dtype=dtype,
        device=str(device),
        backend=backend,
        atol=atol,
        ratio=ratio,
        allow_token_mismatch=allow_token_mismatch,
        ours_error=ours_error,
        reference_error=reference_error,
        num_positions=int(real.sum()),
        ours_tokens=ours_tokens,
        reference_tokens=reference_tokens,
        torch_version=torch.__version__,
        transformers_version=transformers_version,
        llama_port_version=__version__,
        weights_sha256=weights_sha256(ours) if hash_weights else None,
        weights_hash_method=WEIGHTS_HASH_METHOD,
        notes=notes,
    )


def first_divergent(per_layer: Sequence[LayerDiff]) -> LayerDiff | None:
    """The entry where the divergence starts (the rule in the module docstring), or None."""
    previous = 0.0
    for entry in per_layer:
        if _over(entry) and entry.max_abs_diff > JUMP_FACTOR * previous:
            return entry
        previous = entry.max_abs_diff
    # No jump: the error grew gradually; name where it first crossed the threshold.
    return next((entry for entry in per_layer if _over(entry)), None)


def _over(entry: LayerDiff) -> bool:
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
    return _until_eos(sequences[0, prompt.shape[1] :].tolist(), model.config)


def _greedy_reference(model: nn.Module, prompt: Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers' own generate()."""
    from transformers import GenerationConfig

    eos = sorted(_eos_ids(model.config))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None, pad_token_id=pad
    )
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return _until_eos(output[0, prompt.shape[1] :].tolist(), model.config)


def _until_eos(tokens: list[int], config: Any) -> list[int]:
    """The tokens up to and including the first EOS (anything after it is padding)."""
    eos = _eos_ids(config)
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1)
    return tokens[: end + 1]


def _eos_ids(config: Any) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


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


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"model dtype {dtype}; expected one of {sorted(DTYPES)}")


# ---------------------------------------------------------------------------------------- inputs
def random_batch(
    vocab_size: int, batch: int, seq_len: int, pad_token_id: int, seed: int = RANDOM_BATCH_SEED
) -> list[Tensor]:
    """``batch`` rows of random token ids (1-D, real tokens only), seeded; row i is shorter than
    ``seq_len`` by a different number of would-be pads (0 .. seq_len // 2, distinct while the
    range allows), so that left-padding them into one (batch, seq_len) tensor pads each row
    differently."""
    generator = torch.Generator().manual_seed(seed)
    choices = seq_len // 2 + 1
    pads = torch.cat([torch.randperm(choices, generator=generator) for _ in range(-(-batch // choices))])
    return [torch.randint(0, vocab_size, (seq_len - int(p),), generator=generator) for p in pads[:batch]]


def left_pad(rows: Sequence[Tensor], pad_token_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """1-D token rows -> input_ids, attention_mask (B, L), left-padded to ``length`` (default: the
    longest row)."""
    length = max(len(r) for r in rows) if length is None else length
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            input_ids[i, -len(row) :] = row
            attention_mask[i, -len(row) :] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------- checkpoints
def open_source(spec: str | None) -> Any:
    """A CLI checkpoint argument -> llama_port.checkpoints.CheckpointSource (None: the embedded
    SmolLM2 GGUF). Raises the CheckpointError family (FileNotFoundError / ValueError subclasses)
    for a missing path or a folder holding no checkpoint."""
    from .checkpoints import default_checkpoint, open_checkpoint

    return open_checkpoint(default_checkpoint() if spec is None else spec)


def load_reference(source: Any, dtype: str, device: str, attn: str, workdir: Path) -> nn.Module:
    """transformers' own LlamaForCausalLM for ``source``, in eval mode.

    A GGUF is read by transformers' GGUF loader, dequantized to a plain dense model (GgufConfig
    dequantize=True: with the optional ``kernels`` package transformers would otherwise keep the
    blocks packed and compute through ggml kernels, which is not the model we mirror). A Meta
    checkpoint, which transformers cannot read, is first converted to a Hub folder in ``workdir``
    by llama_port, so that reference shares our Meta name mapping.
    """
    import transformers

    kwargs: dict[str, Any] = dict(dtype=DTYPES[dtype], attn_implementation=attn)
    if source.format == "gguf":
        gguf = source.files[0]
        folder = gguf.parent
        kwargs.update(gguf_file=gguf.name, quantization_config=transformers.GgufConfig(dequantize=True))
    elif source.format == "meta":
        from .checkpoints import convert_checkpoint

        folder = workdir / "converted"
        if not folder.exists():
            convert_checkpoint(source.root, folder, progress=False)
    else:
        folder = source.root
    with _transformers_quiet():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except OSError as err:  # unreadable files: one line, exit 2
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"transformers cannot load {folder}: {_first_line(err)}") from err
    return model.to(device).eval()


def load_ours(source: Any, dtype: str, device: str, attn: str) -> nn.Module:
    """llama_port's model for ``source``, read by llama_port's own loader (not from the reference)."""
    from . import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], device=device, attn_implementation=attn, progress=False
    )
    return model.eval()


def load_checkpoint_tokenizer(source: Any) -> Any | None:
    """The checkpoint's tokenizer (a transformers tokenizer), or None when it ships none."""
    from .checkpoints import load_tokenizer

    with _transformers_quiet():
        return load_tokenizer(source.files[0] if source.format == "gguf" else source.root)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' loading bars and info/warning logs off (we show our own progress), and
    stderr captured: its GGUF reader draws a tqdm bar unconditionally."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------- CLI
def run_parity_command(args: argparse.Namespace) -> int:
    """``llama-port parity``: 0 passed, 1 failed; ValueError / FileNotFoundError (exit 2) for bad
    usage or an unreadable checkpoint."""
    from rich.console import Console

    _check_args(args)
    json_to_stdout = args.json == "-"
    # With --json -, stdout carries the JSON alone: the table and progress go to stderr.
    out = Console(file=sys.stderr if json_to_stdout else sys.stdout, highlight=False)
    err_console = Console(file=sys.stderr, highlight=False)
    show_progress = not args.quiet and sys.stderr.isatty()
    started = time.perf_counter()

    with _Progress(err_console, show_progress) as progress, tempfile.TemporaryDirectory() as tmp:
        progress.step("finding the checkpoint")
        source = open_source(args.checkpoint)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            progress.step(f"loading the reference (transformers, {args.dtype}, {args.attn})")
            reference = load_reference(source, args.dtype, args.device, args.attn, Path(tmp))
            reference_fp32 = None
            if args.dtype in LOW_PRECISION:
                progress.step("loading the float32 reference (the yardstick for low precision)")
                reference_fp32 = load_reference(source, "float32", args.device, args.attn, Path(tmp))
            progress.step(f"loading llama_port ({args.dtype}, {args.attn})")
            ours = load_ours(source, args.dtype, args.device, args.attn)
            progress.step("loading the tokenizer")
            tokenizer = load_checkpoint_tokenizer(source)
        input_ids, attention_mask, generation_ids, notes = _build_inputs(args, ours.config, tokenizer)
        notes += [f"while loading: {w.message}" for w in caught if _is_own_warning(w)]
        progress.step(
            f"comparing on {input_ids.shape[0]} rows x {input_ids.shape[1]} tokens, "
            f"then {args.max_new_tokens} greedy tokens"
        )
        report = compare(
            ours,
            reference,
            input_ids,
            attention_mask,
            generation_input_ids=generation_ids,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            atol=args.atol,
            ratio=args.ratio,
            allow_token_mismatch=args.allow_token_mismatch,
            reference_fp32=reference_fp32,
        )
    report.checkpoint = str(source.files[0] if source.format == "gguf" else source.root)
    report.notes = notes + report.notes
    if source.format == "meta":
        report.notes.append(
            "Meta checkpoint: transformers cannot read consolidated.*.pth, so the reference was loaded "
            "from llama_port's conversion of it and shares our Meta name mapping and permutations"
        )
    if args.dtype == "float32" and args.ratio is not None:
        report.notes.append("--ratio applies to bfloat16/float16 only; float32 is judged by --atol")
    if generation_ids is not None and args.max_new_tokens > 0:
        report.notes.append(f"greedy prompt: {_first_prompt(args)!r}")

    print_report(report, out, elapsed=time.perf_counter() - started)
    if args.json == "-":
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    elif args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    if args.plot:
        write_plot(report, args.plot)
    return 0 if report.passed else 1


def _check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 1:
        raise ValueError(f"--seq-len {args.seq_len}; expected >= 1")
    if args.batch < 0:
        raise ValueError(f"--batch {args.batch}; expected >= 0")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}; expected >= 0")
    for flag in ("atol", "ratio"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise ValueError(f"--{flag} {value}; expected a positive number")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if args.attn == "flash_attention_2" and args.device != "cuda":
        raise ValueError("--attn flash_attention_2 needs --device cuda")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ValueError("--prompt: empty prompt text")
    for flag in ("json", "plot"):
        value = getattr(args, flag)
        if value and value != "-" and not Path(value).resolve().parent.is_dir():
            raise FileNotFoundError(f"--{flag} {value}: folder {Path(value).resolve().parent} does not exist")
    if args.plot == "-":
        raise ValueError("--plot needs a file path (a PNG), not '-'")


def _is_own_warning(w: warnings.WarningMessage) -> bool:
    """llama_port's loader warnings (worth a note), not third-party deprecation chatter."""
    return "llama_port" in str(w.filename) or not issubclass(w.category, (DeprecationWarning, FutureWarning))


def _first_prompt(args: argparse.Namespace) -> str:
    return (args.prompt or DEFAULT_PROMPTS)[0]


def _build_inputs(
    args: argparse.Namespace, config: Any, tokenizer: Any | None
) -> tuple[Tensor, Tensor, Tensor | None, list[str]]:
    """The prompts (tokenized) and the random rows, left-padded into one batch; the greedy prompt."""
    notes: list[str] = []
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    rows: list[Tensor] = []
    generation_ids = None
    if tokenizer is not None:
        for text in args.prompt or DEFAULT_PROMPTS:
            ids = tokenizer(text)["input_ids"]
            if not ids:
                raise ValueError(f"--prompt {text!r} tokenizes to no tokens")
            rows.append(torch.tensor(ids, dtype=torch.long))
        generation_ids = rows[0][None]  # (1, T)
    else:
        notes.append("the checkpoint ships no tokenizer: prompts skipped, random tokens only")
        if args.batch == 0:
            raise ValueError("the checkpoint has no tokenizer for the prompts; use --batch >= 1")
    random_rows = random_batch(config.vocab_size, args.batch, args.seq_len, pad)
    length = max([args.seq_len if random_rows else 0] + [len(r) for r in rows])
    input_ids, attention_mask = left_pad(rows + random_rows, pad, length)
    return input_ids, attention_mask, generation_ids, notes


class _Progress:
    """One rich status line on stderr that shows the current step; silent when disabled."""

    def __init__(self, console: Any, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.status = None
        self.current: str | None = None
        self.started = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.status = self.console.status("starting")
            self.status.__enter__()
        return self

    def step(self, message: str) -> None:
        self._finish_current()
        self.current, self.started = message, time.perf_counter()
        if self.status is not None:
            self.status.update(message + " ...")

    def _finish_current(self) -> None:
        if self.enabled and self.current is not None:
            self.console.print(f"[green]done[/] {self.current} ({time.perf_counter() - self.started:.1f}s)")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish_current()
        if self.status is not None:
            self.status.__exit__(exc_type, exc, tb)


# ----------------------------------------------------------------------------------------- output
def print_report(report: ParityReport, console: Any, elapsed: float | None = None) -> None:
    """The report as rich tables: the headline figures, then one row per probe point."""
    from rich.table import Table

    summary = Table(title="llama_port vs transformers", show_header=False, title_justify="left")
    summary.add_column("measure", style="bold")
    summary.add_column("value", overflow="fold")
    summary.add_row("checkpoint", report.checkpoint or "in-memory models")
    summary.add_row("dtype / device / backend", f"{report.dtype} / {report.device} / {report.backend}")
    summary.add_row("positions compared", str(report.num_positions))
    summary.add_row("max |logit diff|", _fmt(report.max_abs_diff))
    summary.add_row("mean |logit diff|", _fmt(report.mean_abs_diff))
    if report.ours_error is not None:
        summary.add_row("ours vs fp32 reference", _fmt(report.ours_error))
        summary.add_row("reference vs fp32 reference", _fmt(report.reference_error))
    summary.add_row("top-1 agreement", f"{report.top1_agreement:.2%}")
    summary.add_row("top-5 agreement", f"{report.top5_agreement:.2%}")
    summary.add_row("max KL(reference || ours)", _fmt(report.kl_max))
    summary.add_row("first divergent layer", report.first_divergent_name or "none")
    if report.greedy_match is None:
        greedy = "not run"
    elif report.greedy_match:
        greedy = f"identical ({len(report.ours_tokens)} tokens)"
    else:
        greedy = f"differ from token {report.first_token_mismatch}"
    summary.add_row("greedy generation", greedy)
    if report.ratio is not None:
        summary.add_row("rule", f"ours vs fp32 <= {report.ratio:g} x reference vs fp32")
    if report.atol is not None:
        summary.add_row("rule", f"max |logit diff| <= {report.atol:.1e}")
    if report.weights_sha256:
        summary.add_row("weights sha256", report.weights_sha256[:16] + "...")
    if elapsed is not None:
        summary.add_row("time", f"{elapsed:.1f}s")
    console.print(summary)

    layers = Table(title="per layer (hidden state after each; lm_head: logits)", title_justify="left")
    layers.add_column("#", justify="right")
    layers.add_column("probe")
    layers.add_column("max |diff|", justify="right")
    layers.add_column("mean |diff|", justify="right")
    layers.add_column("threshold", justify="right")
    for entry in report.per_layer:
        mark = " <- first divergent" if entry.name == report.first_divergent_name else ""
        style = "red" if _over(entry) else None
        layers.add_row(
            "" if entry.layer is None else str(entry.layer),
            entry.name + mark,
            _fmt(entry.max_abs_diff),
            _fmt(entry.mean_abs_diff),
            _fmt(entry.threshold),
            style=style,
        )
    console.print(layers)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.passed:
        console.print("[bold green]PASS[/]: llama_port reproduces transformers on this checkpoint")
    else:
        for failure in report.failures:
            console.print(f"[bold red]FAIL[/]: {failure}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def write_plot(report: ParityReport, path: str | Path) -> None:
    """A PNG of per-layer max and mean |diff| on a log scale, with the thresholds and the first
    divergent entry marked. Exact zeros are drawn at a floor below the smallest nonzero value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e.name for e in report.per_layer]
    values = [e.max_abs_diff for e in report.per_layer] + [e.mean_abs_diff for e in report.per_layer]
    thresholds = [e.threshold for e in report.per_layer]
    positive = [v for v in values + thresholds if v > 0 and math.isfinite(v)]
    floor = min(positive) / 100 if positive else 1e-12  # below every drawn value and threshold
    x = list(range(len(names)))

    def clip(v: float) -> float:
        return v if v > 0 and math.isfinite(v) else floor

    fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * len(names) + 3), 4.8), dpi=120)
    ax.plot(x, [clip(e.max_abs_diff) for e in report.per_layer], "o-", label="max |diff|")
    ax.plot(x, [clip(e.mean_abs_diff) for e in report.per_layer], "s--", ms=3, label="mean |diff|")
    ax.plot(x, [clip(e.threshold) for e in report.per_layer], ":", color="gray", label="threshold")
    if report.first_divergent_name is not None:
        i = names.index(report.first_divergent_name)
        ax.axvline(i, color="red", alpha=0.5, label=f"first divergent: {report.first_divergent_name}")
    ax.set_yscale("log")
    ax.set_xticks(x, [n.replace("layers.", "") for n in names], rotation=90, fontsize=7)
    ax.set_xlabel("probe (embed_tokens, decoder layer index, final norm, lm_head logits)")
    ax.set_ylabel("|llama_port - transformers|")
    verdict = "PASS" if report.passed else "FAIL"
    ax.set_title(f"{verdict}  {report.dtype} / {report.backend} / {report.device}"
                 f"{'  (zeros drawn at %.0e)' % floor if any(v == 0 for v in values) else ''}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = [
    "DEFAULT_PROMPTS",
    "LayerDiff",
    "ParityReport",
    "compare",
    "first_divergent",
    "left_pad",
    "load_checkpoint_tokenizer",
    "load_ours",
    "load_reference",
    "random_batch",
    "open_source",
    "run_parity_command",
    "weights_sha256",
    "write_plot",
]
