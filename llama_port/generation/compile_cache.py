"""A persistent cache of the compiled decode step across processes, built on PyTorch's own caches.

What is kept: inductor's FX graph cache (the generated code and its compiled C++) and its
autotuning results live in ``DIR/torch`` (inductor's cache directory, pointed there only while our
step runs), and after a compile the same entries are also written as one mega-cache file
``DIR/<key>.artifacts`` (``torch.compiler.save_cache_artifacts``), read back with
``load_cache_artifacts`` before a later process's first call. A second process still traces the
step (dynamo); what it skips is inductor's lowering and C++ compiling, the bulk of the first call.

The key (``step_key``) holds everything that changes the graph: versions, the device and ISA, the
model's class and config, dtype, backend, shapes and the inductor options. It goes into torch's
own keys through ``torch.compiler.config.cache_key_tag``, so a different model, dtype, shape,
backend, torch or llama_port source never reuses an entry. The weights are in the key only for a
step compiled with freezing (``inductor_options["freezing"]``): there they are constants of the
graph, and the constants inductor derives from them at lowering time (its C++ GEMM template's
packed copies) are stored in the FX cache entry by value while torch's own key describes them by
shape and dtype only, so two checkpoints of one shape could share an entry and the second run the
first's weights; a SHA-256 of every parameter and buffer prevents that. Without freezing (the
default mode) the weights are inputs of the graph, no entry holds their values, and two
checkpoints of one shape share one entry, each running its own weights (tested); hashing them
would cost a pass over every byte (1.8 s for SmolLM2-135M in fp32, proportionally more for larger models).

``LLAMA_PORT_COMPILE_CACHE`` picks the directory (default ``$XDG_CACHE_HOME/llama_port/compile``,
else ``~/.cache/llama_port/compile``); ``off`` (or ``0``, ``false``, ``no``, empty) turns the
cache off, and with it inductor's own on-disk caches for this step, so nothing unkeyed is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CACHE_ENV_VAR = "LLAMA_PORT_COMPILE_CACHE"
OFF_VALUES = frozenset({"", "0", "off", "false", "no", "none"})
ARTIFACT_SUFFIX = ".artifacts"
# An artifact file: this line, the payload's SHA-256 in hex and a newline, then the payload (the
# bytes of torch.compiler.save_cache_artifacts). A truncated or altered file fails the digest.
ARTIFACT_MAGIC = b"llama_port compile cache v1\n"
KEY_FORMAT = 2  # bump when what the key covers changes
# Config fields that describe a checkpoint, not the graph: left out of the key (the dtype the step
# runs in is keyed from the model's parameters). The loader sets config.dtype per load, on a config
# two loads of one source can share, so keying it made equal models miss each other's entries.
CONFIG_METADATA = frozenset({"dtype", "torch_dtype", "_name_or_path", "name_or_path", "transformers_version", "architectures"})


def cache_directory() -> Path | None:
    """The compile cache's directory from the environment, or None when it is turned off."""
    value = os.environ.get(CACHE_ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama_port" / "compile"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes (tied weights
    once). About 1.8 s for SmolLM2-135M's 0.54 GB in fp32 on a 2-core CPU."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


# llama_port's sources the compiled step runs besides the model's own module classes: the decode
# step, the attention backends and masks, the caches, rope, the activations and the outputs.
STEP_SOURCES = (
    "generation/decoding.py", "generation/compile.py", "attention", "cache.py", "rope.py", "activations.py",
    "outputs.py", "configuration.py", "dtypes.py",
)


def source_digest(model: nn.Module) -> str:
    """SHA-256 of the llama_port sources that make the compiled step's graph: STEP_SOURCES and the
    file of every module class in ``model`` (modeling.py, a quantised linear's file, ...). An edit
    to any of them is a new key even while the version number stays; an edit elsewhere (the CLI)
    is not."""
    package = Path(__file__).resolve().parent.parent
    files = {path for name in STEP_SOURCES for path in ([package / name] if name.endswith(".py") else (package / name).rglob("*.py"))}
    for module_type in {type(module) for module in model.modules()}:
        origin = getattr(sys.modules.get(module_type.__module__), "__file__", None)
        if origin and Path(origin).resolve().is_relative_to(package):
            files.add(Path(origin).resolve())
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _device_description(device_type: str) -> str:
    """What the generated kernels are specialised to: the CPU's vector ISA, or the GPU's model."""
    if device_type == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}:{torch.cuda.get_device_capability()}"
    return f"{device_type}:{torch.backends.cpu.get_cpu_capability()}"


def step_key_fields(
    model: nn.Module, batch_size: int, max_cache_len: int, device_type: str, options: dict[str, object]
) -> dict[str, Any]:
    """Everything that changes the compiled decode step's graph or its constants, as JSON-able
    data: versions (torch, Python, llama_port and a digest of its sources), the device and CPU
    ISA, the model (class, whole config, dtype, attention backend), the static cache's batch size
    and length, the inductor options, and with freezing among them a digest of the weights (the
    graph's constants; module docstring)."""
    from .. import (
        __version__,  # the package's version (llama_port/__init__.py, imported by now)
    )

    return {
        "format": KEY_FORMAT,
        "torch": torch.__version__,
        "python": list(sys.version_info[:2]),
        "llama_port": __version__,
        "llama_port_source": source_digest(model),
        "device": _device_description(device_type),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_METADATA},
        "dtype": str(model.dtype),
        "attention": model.config._attn_implementation,
        "cache": "static",
        "batch_size": batch_size,
        "max_cache_len": max_cache_len,
        "inductor_options": options,
        "weights": weights_digest(model) if options.get("freezing") else "graph inputs",
    }


def step_key(fields: dict[str, Any]) -> str:
    """A short, file-name-safe hash of ``step_key_fields``."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def read_artifact(path: Path) -> bytes | None:
    """The mega-cache payload stored at ``path``, or None when there is none; a file that is not
    one of ours, truncated or altered is ignored with a warning (and compiled anew)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        warnings.warn(f"compile cache: cannot read {path} ({err}); compiling instead", stacklevel=3)
        return None
    header_length = len(ARTIFACT_MAGIC) + 65
    if not data.startswith(ARTIFACT_MAGIC) or len(data) < header_length:
        warnings.warn(f"compile cache: {path} is not a llama_port artifact file; ignored", stacklevel=3)
        return None
    expected = data[len(ARTIFACT_MAGIC) : header_length - 1].decode("ascii", errors="replace")
    payload = data[header_length:]
    if hashlib.sha256(payload).hexdigest() != expected:
        warnings.warn(f"compile cache: {path} is truncated or corrupt (digest mismatch); ignored", stacklevel=3)
        return None
    return payload


def write_artifact(path: Path, payload: bytes) -> None:
    """Write ``payload`` with its header to ``path`` atomically (``write_atomically``)."""
    write_atomically(path, ARTIFACT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder, flushed to disk, then
    ``os.replace``: a reader sees the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block, restored (or removed) after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class CachedStep:
    """One (model, batch size, cache length) compiled step's cache entry in this process.

    ``call(fn, args)`` runs the compiled step with inductor's caches pointed at this entry: the
    first call loads the artifact file if there is a valid one, says on stderr whether it is
    compiling or loading (once), and after a compile writes the artifact file, and beside it
    ``<key>.json``: the key's fields, to see what an entry is for."""

    key: str
    directory: Path | None
    fields: dict[str, Any] = field(default_factory=dict)
    # What the step compiles under: inductor options on CPU, torch.compile's mode on CUDA.
    options: dict[str, Any] = field(default_factory=dict)
    uncached_reason: str | None = None  # why ``directory`` is None for a step that is never cached
    first_call_done: bool = False
    announced: bool = False
    loaded: bool = False

    @property
    def artifact_path(self) -> Path | None:
        return None if self.directory is None else self.directory / f"{self.key}{ARTIFACT_SUFFIX}"

    @contextlib.contextmanager
    def torch_caches(self) -> Iterator[None]:
        """Inductor's caches keyed by ours and kept in our directory, or off when ours is off."""
        import torch._inductor.config as inductor_config

        if self.directory is None:
            with inductor_config.patch({"fx_graph_cache": False, "autotune_local_cache": False}):
                yield
            return
        with (
            torch.compiler.config.patch(cache_key_tag=f"llama_port:{self.key}"),
            inductor_config.patch({"fx_graph_cache": True, "autotune_local_cache": True}),
            _environment("TORCHINDUCTOR_CACHE_DIR", str(self.directory / "torch")),
        ):
            yield

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """``fn(*args)`` under ``torch_caches``; the first call loads / announces / saves."""
        if self.first_call_done:
            with self.torch_caches():
                return fn(*args)
        from torch._dynamo.utils import counters

        if not self.announced:  # a retry after a failed compile (compile.py's fallback) says nothing again
            self.loaded = self._load()
            if self.loaded:
                _say(f"loading the compiled decode step from the cache ({self.artifact_path})")
            elif self.directory is None:
                reason = self.uncached_reason or f"{CACHE_ENV_VAR} is off, nothing cached"
                _say(f"compiling the decode step (first call; {reason})...")
            else:
                _say(f"compiling the decode step (first call; cached in {self.directory})...")
            self.announced = True
        loaded = self.loaded
        misses_before = counters["inductor"]["fxgraph_cache_miss"]
        start = time.perf_counter()
        with self.torch_caches():
            result = fn(*args)
        self.first_call_done = True
        compiled = counters["inductor"]["fxgraph_cache_miss"] > misses_before
        if loaded and compiled:
            _say(f"the cached entry did not match; compiled anew ({time.perf_counter() - start:.1f} s)")
        elif loaded:
            _say(f"compiled decode step ready ({time.perf_counter() - start:.1f} s)")
        if compiled or (self.directory is not None and not loaded):
            self._save()
        return result

    def _load(self) -> bool:
        """Hot-load the artifact file into inductor's caches; False when there is none usable."""
        path = self.artifact_path
        payload = None if path is None else read_artifact(path)
        if payload is None:
            return False
        try:
            with self.torch_caches():
                torch.compiler.load_cache_artifacts(payload)
        except Exception as err:  # a payload of another torch build: torch's own error types vary
            warnings.warn(f"compile cache: {path} could not be loaded ({err}); compiling instead", stacklevel=4)
            return False
        return True

    def _save(self) -> None:
        """Write this process's cache artifacts to the artifact file (nothing when caching is off)."""
        path = self.artifact_path
        if path is None:
            return
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:  # nothing cacheable was compiled (inductor bypassed its cache)
            return
        try:
            write_artifact(path, saved[0])
            write_atomically(path.with_suffix(".json"), json.dumps(self.fields, indent=1, sort_keys=True, default=str).encode())
        except OSError as err:
            warnings.warn(f"compile cache: cannot write {path} ({err}); the next process compiles again", stacklevel=4)
