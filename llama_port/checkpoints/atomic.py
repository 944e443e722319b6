"""Replace a folder as a whole: the new contents are written into a temporary folder beside it, then
swapped in, so whatever fails (a full disk, an exception, SIGINT / SIGTERM, SIGKILL) the folder holds
exactly its old contents or exactly its new ones, never a mix.

The swap is Linux's ``renameat2(RENAME_EXCHANGE)``, one atomic step; where that is unavailable (another
OS, a filesystem without it) two renames, the old folder parked as ``.{name}.llama-port-old-{pid}-{hex}``
in between. Temporary folders are ``.{name}.llama-port-tmp-{pid}-{hex}``: a run killed with SIGKILL
leaves one, and the next write to the same folder removes it once that pid is gone (a parked old folder
whose folder is missing is renamed back first).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY, PARKED = "tmp", "old"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def replace_folder(
    dst: str | os.PathLike, *, overwrite: bool, keep: Callable[[str], bool] | None = None
) -> Iterator[Path]:
    """Yields an empty folder beside ``dst`` (created with its parents if needed) to write the new
    contents into; when the block ends without an error it becomes ``dst`` and the old contents are
    deleted, else it is deleted and ``dst`` is untouched.

    overwrite: False refuses a ``dst`` that is not empty (ValueError). keep: which of the old entries,
    by name, to carry into the new folder (hard links) unless it has them already; None carries none.
    ValueError, before anything is written, for a ``dst`` that is a file, a mount point (it cannot be
    renamed) or that cannot be written. A folder reached through a symlink is replaced where it
    lies, the link kept. A process whose working folder is ``dst`` is left in the deleted old one.
    """
    folder = Path(os.path.realpath(dst))
    with _SignalGuard() as guard:
        staging = _make_staging(folder, dst, overwrite)
        leftover = staging
        try:
            with guard.raising():
                yield staging
                if keep is not None:
                    _carry_over(folder, staging, [p.name for p in folder.iterdir() if keep(p.name)])
            leftover = _swap(staging, folder)
        finally:
            shutil.rmtree(leftover, ignore_errors=True)


def _make_staging(folder: Path, dst: str | os.PathLike, overwrite: bool) -> Path:
    """Check ``folder`` (messages name ``dst``), put back or remove what dead runs left beside it,
    create it if needed, and an empty temporary folder beside it with its mode."""
    if folder.is_file():
        raise ValueError(f"{dst}: is a file; a checkpoint is written to a folder")
    try:
        _recover_or_remove_stale(folder)
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if entries and not overwrite:
            raise ValueError(
                f"{dst}: not empty (holds {entries[:5]}{' ...' if len(entries) > 5 else ''}); "
                "overwrite=True (llama-port convert --overwrite) replaces its contents as a whole"
            )
        folder.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(folder):
            raise ValueError(
                f"{dst}: is a mount point, which cannot be swapped for a new folder; write to a folder inside it"
            )
        if not os.access(folder, os.W_OK | os.X_OK):  # its old files could not be deleted after the swap
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        staging = _sibling(folder, TEMPORARY)
        staging.mkdir()
    except PermissionError as err:
        raise ValueError(f"{dst}: cannot write there ({err.strerror}: {err.filename}); choose a writable folder") from err
    staging.chmod(stat.S_IMODE(folder.stat().st_mode))
    return staging


def _carry_over(old: Path, new: Path, names: list[str]) -> None:
    """Hard-link each of ``names`` from folder ``old`` into folder ``new`` (a copy where linking
    fails), folders recursively and symlinks as symlinks; names ``new`` already has are skipped."""
    for name in names:
        source, target = old / name, new / name
        if target.exists() or target.is_symlink():
            continue
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_dir():
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or protected_hardlinks refusing a file we do not own
        shutil.copy2(source, target)


# ------------------------------------------------------------------------------------------ names
def _sibling(folder: Path, kind: str) -> Path:
    """A fresh name beside ``folder`` for a temporary or a parked old folder of this process."""
    return folder.with_name(f".{folder.name}.llama-port-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _recover_or_remove_stale(folder: Path) -> None:
    """Remove the temporary and parked folders that dead processes left beside ``folder``; a parked
    old folder is renamed back first when ``folder`` itself is missing (a swap killed half-way)."""
    if not folder.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.llama-port-({TEMPORARY}|{PARKED})-(\d+)-[0-9a-f]+\Z")
    matches = [(pattern.match(p.name), p) for p in folder.parent.iterdir()]
    stale = [(m.group(1), p) for m, p in matches if m is not None and not _alive(int(m.group(2)))]
    for kind, path in sorted(stale, key=lambda item: item[0] != PARKED):  # parked ones first
        if kind == PARKED and not folder.exists():
            path.rename(folder)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a reused pid counts as alive: its folder waits for a later write)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ------------------------------------------------------------------------------------------- swap
def _swap(staging: Path, folder: Path) -> Path:
    """Put ``staging`` in ``folder``'s place; returns where the old contents now are, to delete."""
    if _exchange(staging, folder):
        return staging
    parked = _sibling(folder, PARKED)
    os.rename(folder, parked)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(parked, folder)
        raise
    return parked


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the OS, the C library
    or the filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):  # a filesystem or kernel without RENAME_EXCHANGE
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


# ---------------------------------------------------------------------------------------- signals
class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while a folder was being written."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name} while writing")
        self.signum = signum


class _SignalGuard:
    """For its duration (main thread only), SIGINT and SIGTERM whose handlers are the defaults are
    noted instead of ending the process, and raised as ``_Interrupted`` inside ``raising()`` so that
    the temporary folder is removed; on exit the previous handlers come back and a noted signal is
    delivered to them: the process ends (SIGTERM) or raises KeyboardInterrupt (SIGINT) as it would
    have, once the folder is clean. Handlers set by the program, or an ignored signal, are left alone."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.received: int | None = None
        self.raise_now = False

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.received is not None:
            signal.raise_signal(self.received)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        if self.raise_now:
            self.raise_now = False  # once: a second signal must not interrupt the cleanup
            raise _Interrupted(signum)

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Signals noted before or during the block raise ``_Interrupted`` in it."""
        if self.received is not None:
            raise _Interrupted(self.received)
        self.raise_now = True
        try:
            yield
        finally:
            self.raise_now = False
