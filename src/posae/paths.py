"""Where things live, and how files are written so that a killed process never leaves a half file.

Products of a run go under ``runs/<config>/`` at the repository root, whatever the working
directory (papermill runs notebooks from notebooks/ or from the root). ``POSAE_RUNS`` moves them;
``POSAE_CACHE`` moves the model cache (default ``~/.cache/posae``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS_DIR = REPO_ROOT / "params"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
FIGURES_DIR = REPO_ROOT / "figures"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def runs_root() -> Path:
    return Path(os.environ.get("POSAE_RUNS", REPO_ROOT / "runs"))


def run_dir(config_name: str) -> Path:
    return runs_root() / config_name


def activations_dir(config_name: str, layer: int, split: str) -> Path:
    return run_dir(config_name) / "activations" / f"layer_{layer}" / split


def sae_dir(config_name: str, variant: str, layer: int, seed: int) -> Path:
    return run_dir(config_name) / "saes" / variant / f"layer_{layer}" / f"seed_{seed}"


def cache_dir() -> Path:
    base = os.environ.get("POSAE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posae"
    return Path(base)


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _explain_disk_full(e: OSError, path: Path) -> OSError:
    """A full disk or quota, said with the product it hit and the fix; any other error unchanged."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return e
    err = OSError(e.errno, f"{path}: no space left on the device while writing it ({e.strerror}); the previous "
                  "version, if any, is kept. Fix: free disk space, or set POSAE_RUNS to a folder on a larger disk, "
                  "and rerun (finished products are reused)")
    err.__cause__ = e
    return err


class OutputNotWritable(OSError):
    """An output folder cannot be created or written; the message names it and the fix."""


def check_writable(folder: Path | str) -> Path:
    """Create `folder` and write a probe file in it, so that an unwritable output fails before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritable(e.errno, f"{folder}: cannot write the run's products here ({e.strerror}: "
                                         f"{e.filename}). Fix: make the folder writable, or set POSAE_RUNS "
                                         "to a writable folder") from None
    return folder


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    A file has one writer at a time, so what a killed earlier writer of `path` left beside it
    (``.<name>.<random>.tmp``) is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; products are ordinary files
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise _explain_disk_full(e, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path | str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    An older `path` is moved aside first and removed after, so at no moment does a partly
    written folder sit at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the previous version back rather than leave nothing at `path`
                os.replace(old, path)
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _explain_disk_full(e, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(folder: Path, name: str | None = None) -> None:
    """Remove temp files and folders a killed writer left in `folder`: ``.<name>.<random>.tmp``, and the
    ``.<name>.old-<pid>`` that `atomic_dir` moves aside and a kill after that move leaves behind.

    Pass the `name` about to be written to touch only its leftovers: writers of its siblings may be
    live in other processes (the Dask executor trains the seeds of one layer side by side).
    """
    pattern = "*" if name is None else glob.escape(name)
    if folder.exists():
        for p in [*folder.glob(f".{pattern}.*.tmp"), *folder.glob(f".{pattern}.old-*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
