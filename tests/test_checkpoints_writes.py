"""Writes that never lose a checkpoint (save_pretrained, convert_checkpoint, ``llama-port convert``).

A full disk (RLIMIT_FSIZE), an exception between the weights and the config, SIGTERM or SIGKILL
mid-convert: each leaves DST holding exactly the old checkpoint (same files, same logits) and
nothing temporary beside it, and a killed run's temporary folder goes with the next write. convert
never writes a source reached through a symlink, refuses a non-empty DST unless --overwrite (which
then replaces it as a set), a file or read-only DST, and a float8 source kept as float8.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_of, logits_of, make_hf_model, tiny_config_dict, write_tiny_tokenizer

import llama_port
from llama_port import LlamaForCausalLM
from llama_port.checkpoints import atomic, convert_checkpoint, saving
from llama_port.cli import main
from llama_port.configuration import LlamaConfig

pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(llama_port.__file__).parents[1]


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Another checkpoint (other weights, 4 shards + index) with a tokenizer and a chat template: what DST holds."""
    folder = tmp_path_factory.mktemp("other") / "ckpt"
    make_hf_model(tiny_config_dict(), seed=7).save_pretrained(folder, max_shard_size="100KB")
    write_tiny_tokenizer(folder)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


@pytest.fixture
def dst(tmp_path, other) -> Path:
    return Path(shutil.copytree(other, tmp_path / "dst"))


def contents(folder: Path) -> tuple[list[str], torch.Tensor]:
    """Every path in ``folder`` (relative, sorted) and the logits our loader gives from it."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    return files, logits_of(LlamaForCausalLM.from_pretrained(folder))


def assert_holds(folder: Path, expected: tuple[list[str], torch.Tensor]) -> None:
    files, logits = contents(folder)
    assert files == expected[0]
    assert torch.equal(logits, expected[1])


def temporaries(folder: Path) -> list[str]:
    """Hidden entries beside ``folder`` or in it: temporary folders and partial files."""
    return sorted(p.name for p in [*folder.parent.iterdir(), *folder.rglob("*")] if p.name.startswith("."))


def python(code: str, args: list, stdout=None, stderr=None, wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    """``code`` run with ``args`` in a fresh interpreter (through ``wrapper``) that imports this tree's llama_port."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    argv = [*wrapper, sys.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(argv, env=env, text=True, stdout=stdout, stderr=stderr)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------------ a full disk
FULL_DISK = """
import resource, signal, sys
from llama_port import LlamaForCausalLM
from llama_port.checkpoints import convert_checkpoint
src, dst, mode = sys.argv[1:]
model = LlamaForCausalLM.from_pretrained(src)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
if mode == "save":
    model.save_pretrained(dst)
else:
    convert_checkpoint(src, dst, max_shard_size="30KB", overwrite=True)
"""


@pytest.mark.parametrize("mode", ["save", "convert"])
def test_full_disk_keeps_the_old_checkpoint(dst, saved, tmp_path, mode):
    """No file may outgrow 50 kB: save_pretrained's model.safetensors (340 kB) fails; convert's
    30 kB shards all fit, and then the source's 60 kB tokenizer_config.json fails."""
    src = copy_of(saved, "single", tmp_path)
    write_tiny_tokenizer(src)
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{{ messages }}" + " " * 60_000
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    before = contents(dst)
    child = python(FULL_DISK, [src, dst, mode], stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1 and "File too large" in err, err
    assert_holds(dst, before)
    assert temporaries(dst) == []


# --------------------------------------------------------------- an exception before the config
@pytest.mark.parametrize("mode", ["save", "convert"])
def test_failure_between_weights_and_config_keeps_the_old_checkpoint(dst, saved, monkeypatch, mode):
    before = contents(dst)
    model = LlamaForCausalLM.from_pretrained(saved["single"])

    def fail(self, directory):
        assert any(Path(directory).glob("*.safetensors"))  # the weights are written by now
        raise RuntimeError("injected after the weights")

    monkeypatch.setattr(LlamaConfig, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="injected after the weights"):
        if mode == "save":
            model.save_pretrained(dst)
        else:
            convert_checkpoint(saved["single"], dst, max_shard_size="60KB", overwrite=True)
    assert_holds(dst, before)
    assert temporaries(dst) == []


# ------------------------------------------------------------------------ signals mid-convert
SLOW_CONVERT = """
import sys, time
from llama_port.checkpoints import convert_checkpoint, saving
write_shard = saving._write_shard

def slow_write_shard(shard, path, safe_serialization):
    write_shard(shard, path, safe_serialization)
    print("shard written", flush=True)
    time.sleep(60)

saving._write_shard = slow_write_shard
convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="60KB", overwrite=True)
"""


def start_slow_convert(src: Path, dst: Path) -> tuple[subprocess.Popen, list[Path]]:
    """A convert into ``dst`` stopped after its first shard, and its temporary folder(s)."""
    child = python(SLOW_CONVERT, [src, dst], stdout=subprocess.PIPE)
    assert child.stdout.readline() == "shard written\n"
    return child, sorted(dst.parent.glob(f".{dst.name}.llama-port-tmp-{child.pid}-*"))


def test_sigterm_mid_convert_cleans_up_and_dies_by_the_signal(dst, saved):
    before = contents(dst)
    child, staging = start_slow_convert(saved["single"], dst)
    try:
        assert len(staging) == 1 and list(staging[0].glob(".partial-*.safetensors"))
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM  # the signal's usual outcome
    finally:
        child.kill()
    assert_holds(dst, before)
    assert temporaries(dst) == []


def test_sigint_mid_save_cleans_up_then_raises_keyboard_interrupt(dst, saved, monkeypatch):
    """In process: the handlers in place before the write are back, and SIGINT still means KeyboardInterrupt."""
    before = contents(dst)
    model = LlamaForCausalLM.from_pretrained(saved["single"])
    write_shard = saving._write_shard

    def interrupted_write_shard(shard, path, safe_serialization):
        write_shard(shard, path, safe_serialization)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(saving, "_write_shard", interrupted_write_shard)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(dst, max_shard_size="100KB")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert_holds(dst, before)
    assert temporaries(dst) == []


def test_sigkill_mid_convert_leaves_a_folder_the_next_write_removes(dst, saved):
    before = contents(dst)
    child, staging = start_slow_convert(saved["single"], dst)
    child.kill()
    child.wait(timeout=30)
    assert len(staging) == 1 and staging[0].is_dir()  # recognisable by name: the dead run's pid
    assert_holds(dst, before)
    alive = dst.parent / f".{dst.name}.llama-port-tmp-{os.getpid()}-0123abcd"  # a live run's: kept
    alive.mkdir()

    convert_checkpoint(saved["single"], dst, overwrite=True)
    assert not staging[0].exists() and alive.is_dir()
    alive.rmdir()
    assert temporaries(dst) == []
    assert torch.equal(contents(dst)[1], logits_of(LlamaForCausalLM.from_pretrained(saved["single"])))


# ---------------------------------------------------------------------------- the destination
def test_convert_refuses_a_source_file_linked_from_dst(tmp_path, saved, capsys):
    """SRC/model.safetensors is a symlink into REAL: converting SRC into REAL would replace it."""
    real = copy_of(saved, "single", tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real / "config.json", src)
    (src / "model.safetensors").symlink_to(real / "model.safetensors")
    original = (real / "model.safetensors").read_bytes()
    message = rf"{real}: holds the source file {src / 'model.safetensors'} \(resolved: {real / 'model.safetensors'}\)"
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(src, real, dtype="bfloat16", overwrite=True)
    assert main(["convert", str(src), str(real), "--dtype", "bfloat16"]) == 2
    assert "holds the source file" in capsys.readouterr().err
    assert (real / "model.safetensors").read_bytes() == original


def test_convert_into_a_non_empty_dst_needs_overwrite_and_replaces_it_as_a_set(dst, layouts, capsys):
    before = contents(dst)
    assert main(["convert", str(layouts["single"]), str(dst)]) == 2
    assert f"{dst}: not empty" in capsys.readouterr().err
    assert_holds(dst, before)

    assert main(["convert", str(layouts["single"]), str(dst), "--overwrite"]) == 0
    source_tokenizer = {p.name for p in layouts["single"].iterdir()} - {"config.json", "model.safetensors"}
    assert sorted(p.name for p in dst.iterdir()) == sorted({"config.json", "model.safetensors", *source_tokenizer})
    assert "chat_template.jinja" not in source_tokenizer  # so the old checkpoint's went with the rest
    assert torch.equal(contents(dst)[1], logits_of(LlamaForCausalLM.from_pretrained(layouts["single"])))
    assert temporaries(dst) == []


def test_dst_that_is_a_file_or_a_mount_point(tmp_path, saved, capsys, monkeypatch):
    path = tmp_path / "weights"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"{path}: is a file; a checkpoint is written to a folder"):
        convert_checkpoint(saved["single"], path)
    with pytest.raises(ValueError, match=rf"{path}: is a file"):
        LlamaForCausalLM.from_pretrained(saved["single"]).save_pretrained(path)
    assert main(["convert", str(saved["single"]), str(path)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert path.read_text() == "not a folder"

    mount = tmp_path / "mnt"
    monkeypatch.setattr(os.path, "ismount", lambda folder: Path(folder) == mount)
    with pytest.raises(ValueError, match=rf"{mount}: is a mount point, which cannot be swapped"):
        convert_checkpoint(saved["single"], mount)
    assert sorted(tmp_path.iterdir()) == [mount, path] and not any(mount.iterdir())


CONVERT = """
import sys
from llama_port.checkpoints import convert_checkpoint
try:
    convert_checkpoint(sys.argv[1], sys.argv[2], overwrite=True)
except ValueError as err:
    sys.exit(str(err))
"""


def test_dst_that_is_read_only(dst, saved):
    """Run where permissions apply: as root, without the capabilities that override them (setpriv)."""
    wrapper = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root writes through any permission, and setpriv is not there to drop that")
        wrapper = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner")
    before = contents(dst)
    dst.chmod(0o555)
    try:
        child = python(CONVERT, [saved["single"], dst], stderr=subprocess.PIPE, wrapper=wrapper)
        _, err = child.communicate(timeout=120)
    finally:
        dst.chmod(0o755)
    assert child.returncode == 1
    assert err == f"{dst}: cannot write there (Permission denied: {dst}); choose a writable folder\n"
    assert_holds(dst, before)
    assert temporaries(dst) == []


# ----------------------------------------------------------------------------------- dtypes
def test_float8_is_written_only_as_a_dtype_the_loader_reads(tmp_path, hf_model):
    src = tmp_path / "fp8"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", **tiny_config_dict()}))  # no dtype
    fp8 = {name: t.to(torch.float8_e4m3fn) for name, t in hf_model.state_dict().items()}
    save_file(fp8, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    expected = r"tensor '[\w.]+' would be written as float8_e4m3fn, which llama_port does not load.*--dtype bfloat16"
    with pytest.raises(ValueError, match=expected):
        convert_checkpoint(src, out)
    assert not any(out.iterdir())

    convert_checkpoint(src, out, dtype="bfloat16")
    ours = LlamaForCausalLM.from_pretrained(out)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(logits_of(ours), logits_of(LlamaForCausalLM.from_pretrained(src, dtype="bfloat16")))
    with pytest.raises(ValueError, match=r"would be written as float8_e4m3fn.*model\.to\(torch\.bfloat16\)"):
        ours.to(torch.float8_e4m3fn).save_pretrained(tmp_path / "saved")


# --------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_replaces_the_model_files_and_keeps_the_rest(dst, saved):
    """As transformers: the earlier save's shards and index go; the tokenizer, a README and a
    folder stay, carried over as hard links (the same files, not copies)."""
    (dst / "README.md").write_text("my model")
    (dst / "original").mkdir()
    (dst / "original" / "params.json").write_text("{}")
    kept = sorted(p.name for p in dst.iterdir() if not p.name.startswith(("model", "config")))
    inodes = {name: (dst / name).stat().st_ino for name in ["README.md", "tokenizer.json", "original/params.json"]}
    model = LlamaForCausalLM.from_pretrained(saved["single"])
    model.save_pretrained(dst)
    assert sorted(p.name for p in dst.iterdir()) == sorted([*kept, "config.json", "model.safetensors"])
    assert "tokenizer.json" in kept and (dst / "README.md").read_text() == "my model"
    assert {name: (dst / name).stat().st_ino for name in inodes} == inodes
    assert torch.equal(contents(dst)[1], logits_of(model))
    assert temporaries(dst) == []


def test_without_an_atomic_exchange_two_renames_do(dst, saved, monkeypatch):
    """Where renameat2 is missing, the old folder is parked under a recognisable name, then removed;
    one parked by a run killed between the two renames is put back by the next write."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    model = LlamaForCausalLM.from_pretrained(saved["single"])
    model.save_pretrained(dst)
    after = contents(dst)
    assert temporaries(dst) == []

    parked = dst.parent / f".{dst.name}.llama-port-old-{dead_pid()}-0123abcd"
    dst.rename(parked)
    with monkeypatch.context() as patch:
        patch.setattr(LlamaConfig, "save_pretrained", lambda self, directory: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            model.save_pretrained(dst, max_shard_size="100KB")
    assert_holds(dst, after)
    assert temporaries(dst) == []


def test_overwrite_never_empties_a_folder_of_other_things(tmp_path, saved):
    """--overwrite replaces a checkpoint: `convert SRC ~ --overwrite` must not delete a home folder."""
    home = tmp_path / "home"
    (home / ".git").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--overwrite replaces a checkpoint folder, and this one also holds \.git, notes\.txt"):
        convert_checkpoint(saved["single"], home, overwrite=True)
    assert sorted(p.name for p in home.iterdir()) == [".git", "notes.txt"]
