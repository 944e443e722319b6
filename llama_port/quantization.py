"""Weight-only int8: each nn.Linear's weight stored as int8 with one scale per output channel.

``quantize_weights(model, "int8")`` replaces the model's ``nn.Linear`` modules in place by
``Int8Linear`` (the decoder layers' seven projections and, unless skipped, the head); the rest
(embedding, norms, rotary, KV cache) keeps the model's dtype. Per row n of a weight W (N, K):
``scale[n] = max_k |W[n, k]| / 127`` (symmetric, no zero point) and
``q[n, k] = round(W[n, k] / scale[n])`` in [-127, 127], so ``q * scale`` is within half a step
(``scale[n] / 2``) of W everywhere. A state dict then reads ``...q_proj.weight`` (int8 (N, K)) and
``...q_proj.weight_scale`` ((N,), in the kernel's input dtype: bfloat16 for a float32 or bfloat16
model, float16 for a float16 one), which is what save_pretrained writes and
from_pretrained reads back (``quantization_config`` in config.json, ``QUANTIZATION_CONFIG`` below).

The matmul is PyTorch's weight-only int8 kernel, ``torch.ops.aten._weight_int8pack_mm(x (M, K),
q (N, K), scale (N,)) -> (M, N)``: it reads one byte per weight (a quarter of fp32's memory traffic,
which is what bounds decoding). On the CPU its vectorised (AVX512) path takes bfloat16 or float16
inputs only: float32 inputs run a scalar loop, measured 15x slower than the bfloat16 path and 3x
slower than an fp32 matmul. So a float32 model's projections take their input rounded to bfloat16
and return float32 (accumulation inside the kernel is float32), and the scales are kept in
bfloat16, the dtype the kernel takes them in (no cast per call); everything between them (norms,
attention, residuals, softmax) stays float32. The kernel's cost grows faster than its rows
past 4 (measured: 8 rows cost 4x what 4 do), so up to ``KERNEL_MAX_ROWS`` rows go through it in
blocks of ``KERNEL_BLOCK_ROWS``; past that (a long prefill) the weight is dequantized to the same
bfloat16 and multiplied densely: the same inputs, rounded alike, one rounding of q * scale more.

Inference only: the kernel has no derivative, so a forward whose input requires grad raises.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configuration import short_repr

QUANTIZE_METHODS = ("int8",)
QUANT_METHOD = "llama_port"  # config.json's quantization_config["quant_method"] for this format
# The config.json entry of a model quantized here (modules_not_converted filled per model).
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "group": "per_channel", "symmetric": True}
QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # the int8 kernel's vectorised input dtypes
KERNEL_BLOCK_ROWS = 4  # rows per kernel call: its cost per row is flat up to 4, then grows
KERNEL_MAX_ROWS = 32  # above this many rows a dequantized dense matmul is faster (measured, 1 core)


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, with q int8 (N, K) and scale (N,) per output channel.

    ``weight`` (int8, N = out_features, K = in_features) and ``weight_scale`` (``kernel_dtype`` of
    the model's dtype) are parameters that never require grad, so the loader fills them by name as
    it fills any weight and ``model.to(dtype)`` casts the scales (never the int8 weight). ``bias``
    as nn.Linear's, in the model's dtype. Build one with ``from_linear`` (quantizes a filled nn.Linear) or ``like`` (empty,
    on the linear's device: the structure a saved int8 checkpoint is loaded into).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)  # fmt: skip
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=kernel_dtype(dtype), device=device),
                                         requires_grad=False)  # fmt: skip
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear) -> Int8Linear:
        """An empty Int8Linear of ``linear``'s shape, bias, dtype (for the scales) and device."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None,
                   dtype=linear.weight.dtype, device=linear.weight.device)  # fmt: skip

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """``linear`` quantized (module docstring); its bias copied as it is."""
        module = cls.like(linear)
        q, scale = quantize_per_channel(linear.weight, module.weight_scale.dtype)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """q * scale[:, None] (N, K) in ``dtype`` (default: the scales' dtype)."""
        dtype = self.weight_scale.dtype if dtype is None else dtype
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., N) in x's dtype; the matmul's inputs in bfloat16 unless x is
        bfloat16 or float16 (module docstring). RuntimeError when x requires grad."""
        if x.requires_grad:
            raise RuntimeError(
                "Int8Linear is inference-only (the int8 kernel has no derivative); run it under "
                "torch.no_grad() / torch.inference_mode(), and train the unquantized model"
            )
        dtype = kernel_dtype(x.dtype)
        rows = x.reshape(-1, self.in_features).to(dtype).contiguous()  # (M, K): the kernel takes 2-D rows
        scale = self.weight_scale.to(dtype)  # no copy unless the model was cast after quantizing
        if rows.shape[0] <= KERNEL_BLOCK_ROWS and rows.device.type == "cpu":  # decoding: one call
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, scale)  # (M, N)
        elif rows.shape[0] <= KERNEL_MAX_ROWS and rows.device.type == "cpu":
            blocks = rows.split(KERNEL_BLOCK_ROWS)  # (<= 4, K) each
            out = torch.cat([torch.ops.aten._weight_int8pack_mm(block, self.weight, scale) for block in blocks])  # (M, N)
        else:  # a long prefill, or a device without the kernel: dequantize and multiply densely
            out = F.linear(rows, self.dequantized_weight(dtype))  # (M, N)
        out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (..., N)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 per-channel, scales {str(self.weight_scale.dtype).removeprefix('torch.')}")  # fmt: skip


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the int8 kernel takes its inputs and scales in for a model computing in ``dtype``:
    bfloat16 or float16 as they are, bfloat16 for anything else (float32)."""
    return dtype if dtype in KERNEL_DTYPES else torch.bfloat16


def quantize_per_channel(weight: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """weight (N, K) -> (q int8 (N, K), scale (N,) in ``scale_dtype``), symmetric per row.

    q is rounded against the scale as stored (after its rounding to ``scale_dtype``), so
    |q * scale - weight| <= scale / 2 holds for the scale the model uses. An all-zero row gets
    scale 1 (any positive scale represents it exactly)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # (N,)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(scale_dtype)  # (N,)
    q = torch.round(w / scale.float()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (N, K)
    return q, scale


def check_method(method: object) -> str:
    """``method`` if it is one of QUANTIZE_METHODS, else ValueError naming them."""
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize={method!r}; expected one of {list(QUANTIZE_METHODS)} (or None: no quantization)")
    return method


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``skip`` or inside one of them."""
    return any(name == s or name.startswith(s + ".") for s in skip)


def convertible(model: nn.Module, skip: Iterable[str]) -> list[str]:
    """The qualified names of the nn.Linear modules quantize_weights converts (skip left out)."""
    skip = tuple(skip)
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and not is_skipped(name, skip)]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def quantize_linear(model: nn.Module, name: str, *, empty: bool = False) -> Int8Linear:
    """Replace the nn.Linear at ``name`` by its Int8Linear (``empty``: shapes only, to be loaded)."""
    linear = model.get_submodule(name)
    module = Int8Linear.like(linear) if empty else Int8Linear.from_linear(linear)
    replace_module(model, name, module)
    return module


def quantize_weights(model: nn.Module, method: str = "int8", *, skip: Iterable[str] = (), empty: bool = False) -> nn.Module:
    """Replace every nn.Linear of ``model`` except those named in ``skip`` (and modules inside
    them) by an Int8Linear, in place; returns ``model``. Already converted modules are left as
    they are, so a second call only converts what is left.

    A head tied to the input embedding becomes an int8 copy of it and ``config.tie_word_embeddings``
    is set False: the embedding keeps the model's dtype (a lookup reads one row per token), and
    re-tying would put the float tensor back in the head. ``config.quantization_config`` records
    the format and ``modules_not_converted`` (the skipped nn.Linear modules). ``empty``: the
    converted modules are empty, of the right shapes (loading a saved int8 checkpoint into them).

    ValueError for an unknown ``method`` or a model dispatched by accelerate (``hf_device_map``:
    its hooks sit on the modules being replaced)."""
    check_method(method)
    if getattr(model, "hf_device_map", None) is not None:
        raise ValueError("quantize: this model is dispatched by accelerate (device_map); load it on one device to quantize")
    skip = tuple(skip)
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    for name in convertible(model, skip):
        quantize_linear(model, name, empty=empty)
    if config is not None:
        if head is not None and getattr(model, "lm_head", None) is not head:
            config.tie_word_embeddings = False  # the head is an int8 copy of its own now
        skipped = sorted({name for name, m in model.named_modules() if type(m) is nn.Linear})
        # An unknown config key (config.json's own), kept in LlamaConfig's store of extra keys.
        config._extra["quantization_config"] = {**QUANTIZATION_CONFIG, "modules_not_converted": skipped}
    return model


def read_quantization_config(value: object, where: object) -> list[str]:
    """The modules_not_converted of a config.json ``quantization_config`` written by quantize_weights.

    ValueError naming ``where`` for anything else: another library's quantization (bitsandbytes,
    GPTQ, AWQ, ...: transformers' formats, which llama_port does not read) or a malformed entry."""
    if not isinstance(value, dict) or value.get("quant_method") != QUANT_METHOD:
        method = value.get("quant_method", "?") if isinstance(value, dict) else value
        raise ValueError(
            f"{where}: a quantized checkpoint (quant_method={short_repr(method)}); llama_port reads unquantized "
            f"weights and its own int8 format (quant_method {QUANT_METHOD!r}) only"
        )
    expected = {key: value.get(key) for key in QUANTIZATION_CONFIG}
    skipped = value.get("modules_not_converted", [])
    if expected != QUANTIZATION_CONFIG or not (isinstance(skipped, list) and all(isinstance(s, str) for s in skipped)):
        raise ValueError(
            f"{where}: quantization_config {short_repr(value)}; llama_port's int8 format is {QUANTIZATION_CONFIG} "
            "with modules_not_converted a list of module names"
        )
    return skipped
