"""Where things live, and how files are written so that a killed process never leaves a half file.

Products of a run go under ``runs/<config>/`` at the repository root, whatever the working
directory (papermill runs notebooks from notebooks/ or from the root). ``POSAE_RUNS`` moves them;
``POSAE_CACHE`` moves the model cache (default ``~/.cache/posae``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS_DIR = REPO_ROOT / "params"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
FIGURES_DIR = REPO_ROOT / "figures"
FIGURES_ENV = "POSAE_FIGURES"


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


def shown(path: Path | str) -> str:
    """A path as a reader of a rendered notebook should see it: relative to the repository (or the home
    folder), not the absolute path of the machine that ran it."""
    path = Path(path).resolve()
    for base, prefix in ((REPO_ROOT, ""), (runs_root().resolve(), "$POSAE_RUNS/"), (Path.home(), "~/")):
        if path == base or base in path.parents:
            rel = path.relative_to(base).as_posix()
            return prefix + rel if prefix or rel != "." else "."
    return str(path)


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

    Several processes may write one product at once (every notebook records the environment):
    each writes its own temp, whose name carries its writer (`writer_tag`), and the last rename
    wins with one writer's whole content. Temps of writers that are gone (killed) are removed first;
    a live writer's never are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
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


def read_json_object(path: Path, error: type[Exception], fix: str) -> dict:
    """The JSON object in `path`; `error` naming the file and `fix` when it is not valid JSON or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}). {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: not a JSON object. {fix}")
    return obj


def write_json_atomic(path: Path | str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    An older `path` is moved aside first and removed after, so at no moment does a partly
    written folder sit at `path`. Writers of one folder may overlap (a driver and a hand-run
    notebook): each writes its own temp, and when another writer's folder lands between our move
    aside and our rename, it is moved aside in turn, so the last writer wins with its whole folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _fsync_dir(tmp)
        olds = _swap_in(tmp, path)
        _fsync_dir(path.parent)
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _explain_disk_full(e, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path, attempts: int = 100) -> list[Path]:
    """Rename `tmp` onto `path`, moving what is there aside; returns the folders moved aside."""
    olds: list[Path] = []
    for attempt in range(attempts):
        old = path.with_name(f".{path.name}.old-{writer_tag()}.{attempt}")
        if path.exists():
            try:
                os.replace(path, old)
                olds.append(old)
            except FileNotFoundError:
                pass  # another writer just moved it aside
        try:
            os.replace(tmp, path)
            return olds
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if olds:  # put the previous version back rather than leave nothing at `path`
                    with contextlib.suppress(OSError):
                        os.replace(olds.pop(), path)
                raise
            # another writer's folder landed at `path` in between: move it aside too, and retry
    raise OSError(errno.EBUSY, f"{path}: other writers kept replacing it; {attempts} attempts")


# --------------------------------------------------------------------------- writers and locks
#
# A temp file or folder is named for its writer, ``.<name>.w<pid>-<host>.<random>.tmp``, so a cleanup can
# tell a killed writer's leftovers (remove) from a live writer's work in progress (keep). Locks are
# flock(2) locks: the kernel releases them when the holder dies, so a killed holder's lock is free at
# once, with nothing to clean up. The lock file holds who took it last, for the message of whoever waits.

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
_WRITER = re.compile(r"\.w(?P<pid>\d+)-(?P<host>[A-Za-z0-9_-]*)\.[^.]*\.tmp$|\.old-w(?P<opid>\d+)-(?P<ohost>[A-Za-z0-9_-]*)\.\d+$")
OTHER_HOST_STALE_S = 24 * 3600  # a temp written on another machine (a Dask worker) counts as stale after this


def writer_tag() -> str:
    """What names this process in its temp files: ``w<pid>-<host>``."""
    return f"w{os.getpid()}-{_HOST}"


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_alive(pid: int, host: str, since: float) -> bool:
    """Whether the writer that made a file at time `since` may still be writing it.

    On this machine: the process exists and is not a newer process that reuses the pid. On another
    machine it cannot be asked: a file there is live until it is `OTHER_HOST_STALE_S` old.
    """
    if host != _HOST:
        return time.time() - since < OTHER_HOST_STALE_S
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    return started is None or started <= since + 1.0


def _stale(p: Path) -> bool:
    m = _WRITER.search(p.name)
    if m is None:
        return True  # a temp of the older unnamed form: its writer predates this code
    pid, host = (m["pid"], m["host"]) if m["pid"] else (m["opid"], m["ohost"])
    try:
        since = p.lstat().st_mtime
    except FileNotFoundError:
        return False
    return not writer_alive(int(pid), host, since)


class Busy(RuntimeError):
    """A lock is held by another live process; the message names it (pid, host, start) and what to do."""


def lock_path(product: Path | str, purpose: str) -> Path:
    """The lock file of `product` for one `purpose` ("train", "swap", ...): ``.<name>.<purpose>.lock``
    beside it (git-ignored). One file per purpose, since a process holding one lock may take another."""
    product = Path(product)
    return product.with_name(f".{product.name}.{purpose}.lock")


def _holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info['pid']} on {info.get('host')} ({info.get('what', 'working')}, since {started})"


@contextlib.contextmanager
def locked(path: Path | str, what: str, *, shared: bool = False, wait: bool = True,
           busy_fix: str = "") -> Iterator[None]:
    """Hold a lock on the file `path` (created if absent) for the duration: exclusive, or `shared`
    (many readers, no exclusive holder).

    `what` says what the holder does, for the others' messages. Held by another live process: with
    `wait`, say so once on stderr and block until it is free; without, raise `Busy` naming the holder
    and `busy_fix` (which may name the holder's ``{pid}``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                fix = busy_fix.format(pid=holder.get("pid", "its pid"))
                raise Busy(f"{what}: {path.parent} is in use by {describe_holder(holder)}. {fix}".rstrip()) from None
            print(f"posae: {what}: waiting for {describe_holder(holder)}", file=sys.stderr, flush=True)
            fcntl.flock(fd, mode)
        if not shared:  # who holds it, for the next one's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": _HOST, "what": what, "since": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def clean_stale_temps(folder: Path, name: str | None = None) -> None:
    """Remove temp files and folders a killed writer left in `folder`: ``.<name>.<writer>.<random>.tmp``,
    and the ``.<name>.old-<writer>`` that `atomic_dir` moves aside and a kill after that move leaves
    behind. A live writer's are kept (`writer_alive`), whoever asks.

    Pass the `name` about to be written to touch only its leftovers.
    """
    pattern = "*" if name is None else glob.escape(name)
    if folder.exists():
        for p in [*folder.glob(f".{pattern}.*.tmp"), *folder.glob(f".{pattern}.old-*")]:
            if _stale(p):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def figures_dir(config_name: str) -> Path:
    """``$POSAE_FIGURES/<config>`` when that is set, else ``figures/<config>`` at the repository root."""
    root = os.environ.get(FIGURES_ENV)
    return (Path(root) if root else FIGURES_DIR) / config_name


def write_csv_atomic(df: Any, path: Path) -> None:
    """A pandas DataFrame as CSV (no index), atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
