"""The activation store: one folder per (layer, split), memory-mapped, loadable without unpickling.

Layout of ``runs/<config>/activations/layer_<L>/<split>/``::

    acts.npy     [N, D] raw activations in 16 bits: float16 when every value fits its range,
                 else bfloat16 bits kept as uint16 (numpy has no bfloat16)
    tokens.npy   [N] token ids      pos.npy [N] position in the sequence      seq.npy [N] sequence id
    mean.npy     [D] training mean (float32), used to centre
    meta.json    model, layer, split, dtypes, count, d_model, scale, content hash, the config settings
                 it was captured under (a reader refuses a stale store: `open_layer_stores`), and the
                 size and digest of every array file (`files`), ...

Stores are written into a temporary folder and renamed into place once complete (`atomic_dir`), so
a folder named like a store with a meta.json is always whole. What happens to it after is checked on
reading: `ActivationStore.open` compares every file's size with meta.json's (a stat: free), and
`verify` (which `is_complete`, hence the capture's decision to reuse a store, calls) its digest.

Normalisation (docs/decisions.md §4, §9): centre with the training mean μ, then multiply by one scale per layer
chosen so that the mean squared norm of the centred training activations is d. Both live in the
store; `normalised` applies them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import dtype_to_descr, write_array_header_1_0

from posae.config import Config, to_dict
from posae.paths import activations_dir, atomic_dir, clean_stale_temps, lock_path, locked, read_json_object, run_dir

FORMAT_VERSION = 1
_FP16_MAX = 65504.0
_ARRAYS = ("acts", "tokens", "pos", "seq")


class StoreError(RuntimeError):
    """A store is missing, incomplete, corrupt or stale; the message says which and what to do."""


RECAPTURE = "Fix: run notebooks/01_capture_activations.ipynb for this config (it recaptures this store)"


# --------------------------------------------------------------------------- file digests
#
# Every product records, where it is written, the size and a digest of each file it holds: a store in
# its meta.json, an SAE run in its config.json (`posae.checkpoint`), a driver stage in its record
# (`posae.pipeline.stages`). A reader compares them, so a truncated, edited or swapped file is named instead
# of read. sha256 (hashlib): ~1.0 s per GB on an idle core here (2.2 s under load), against xxh3-128's
# 0.14 s; cheap enough for the default config's 1.5 GB of products, and a dependency we already have.

DIGEST = "sha256"


def hasher():
    return hashlib.new(DIGEST)


def file_digest(path: Path | str) -> str:
    """`DIGEST:<hex>` of the file's bytes. Read, not memory-mapped: a file truncated while it is hashed
    must give a wrong digest, not a SIGBUS."""
    with open(path, "rb") as fh:
        return f"{DIGEST}:{hashlib.file_digest(fh, DIGEST).hexdigest()}"


def file_record(path: Path | str) -> dict[str, Any]:
    """What a writer records of a file it wrote: its size and digest."""
    return {"size": os.stat(path).st_size, "digest": file_digest(path)}


def file_problem(path: Path | str, recorded: dict[str, Any], shown: str | None = None,
                 where: str = "") -> str | None:
    """Why the file at `path` is not the one `recorded` (by `file_record`, in the file `where` names) describes,
    naming it as `shown`; None when it is. The size is compared first (a stat), the digest only then."""
    shown = str(path) if shown is None else shown
    where = f" in {where}" if where else ""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return f"{shown} is missing"
    if size != recorded.get("size"):
        return f"{shown}: size {size} != recorded {recorded.get('size')}{where}"
    if file_digest(path) != recorded.get("digest"):
        return f"{shown}: content changed (its digest differs from the one recorded{where} when it was written)"
    return None


def reason(message: str | BaseException) -> str:
    """An error message without its `Fix: ...` part: what went wrong, for a line that says what happens next."""
    return str(message).split(" Fix: ", 1)[0].rstrip(".")


def _to_bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


class _NpyAppender:
    """A .npy file of known shape written front to back through a plain file handle.

    Sequential writes go through the page cache, not a memory map, so the writer's resident memory
    stays flat however many tokens are captured (a written memmap keeps its dirty pages resident).
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.dtype = path, np.dtype(dtype)
        self._fh = open(path, "wb")
        self._hash, self.size = hasher(), 0  # of every byte written: the digest costs no second read
        header = io.BytesIO()
        write_array_header_1_0(header, {"descr": dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        self._put(header.getvalue())
        self.header_bytes = self.size

    def _put(self, data: bytes) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self.size += len(data)

    def write(self, arr: np.ndarray) -> None:
        self._put(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())

    def record(self) -> dict[str, Any]:
        """`file_record` of what was written, without reading it back."""
        return {"size": self.size, "digest": f"{DIGEST}:{self._hash.hexdigest()}"}

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            finally:  # a full disk fails the flush: the handle is closed all the same
                self._fh.close()


class StoreWriter:
    """Stream activations into a new store; on a clean exit the store appears at `path` at once.

    `stats_from=None` computes μ and the scale from this store's own data (the training split);
    passing the training store copies its μ and scale (the validation split).
    """

    def __init__(self, path: Path | str, n_tokens: int, d_model: int, meta: dict[str, Any],
                 stats_from: "ActivationStore | None" = None):
        self.path = Path(path)
        self.n_tokens, self.d_model, self.meta = n_tokens, d_model, dict(meta)
        self.stats_from = stats_from
        self._n = 0
        self._sum_D = np.zeros(d_model, dtype=np.float64)
        self._sumsq = 0.0
        self._absmax = 0.0
        self._storage = "float16"

    def __enter__(self) -> "StoreWriter":
        clean_stale_temps(self.path.parent, self.path.name)
        self._ctx = atomic_dir(self.path)
        self._tmp = self._ctx.__enter__()
        N, D = self.n_tokens, self.d_model
        # float16 bits until a value overflows float16's range; then bfloat16 bits (see _switch_to_bf16).
        self._acts = _NpyAppender(self._tmp / "acts.npy", np.uint16, (N, D))
        self._idx = {name: _NpyAppender(self._tmp / f"{name}.npy", np.int32, (N,)) for name in ("tokens", "pos", "seq")}
        return self

    def append(self, acts_BD, tokens_B, pos_B, seq_B) -> None:
        x_BD = torch.as_tensor(acts_BD)
        B = x_BD.shape[0]
        if self._n + B > self.n_tokens:
            raise StoreError(f"{self.path}: more tokens appended than the {self.n_tokens} announced")
        x32_BD = x_BD.float()
        if not torch.isfinite(x32_BD).all():
            raise StoreError(f"{self.path}: non-finite activations at tokens {self._n}..{self._n + B}; "
                             "the model's forward overflowed. Fix: set model.dtype: float32")
        self._sum_D += x32_BD.sum(0, dtype=torch.float64).numpy()
        self._sumsq += float(x32_BD.pow(2).sum(dtype=torch.float64))
        self._absmax = max(self._absmax, float(x32_BD.abs().max()))
        if self._absmax > _FP16_MAX and self._storage == "float16":
            self._switch_to_bf16()
        if self._storage == "float16":
            self._acts.write(x32_BD.to(torch.float16).view(torch.int16).numpy().view(np.uint16))
        else:
            self._acts.write(_to_bf16_bits(x32_BD))
        for name, arr in (("tokens", tokens_B), ("pos", pos_B), ("seq", seq_B)):
            self._idx[name].write(np.asarray(arr))
        self._n += B

    def _switch_to_bf16(self) -> None:
        """A value overflowed float16: rewrite the rows so far as bfloat16 bits and go on in bfloat16."""
        self._acts.close()
        header = self._acts.header_bytes
        fp16_path = self._acts.path.with_name("acts_fp16.npy")
        self._acts.path.replace(fp16_path)
        done = np.memmap(fp16_path, dtype=np.uint16, mode="r", offset=header, shape=(self._n, self.d_model))
        self._acts = _NpyAppender(self._tmp / "acts.npy", np.uint16, (self.n_tokens, self.d_model))
        for s in range(0, self._n, 65536):
            rows = torch.from_numpy(np.array(done[s:min(s + 65536, self._n)]).view(np.int16))
            self._acts.write(_to_bf16_bits(rows.view(torch.float16).float()))
        del done
        fp16_path.unlink()
        self._storage = "bfloat16"

    def _finish(self) -> None:
        if self._n != self.n_tokens:
            raise StoreError(f"{self.path}: {self._n} tokens written, {self.n_tokens} announced")
        if self.stats_from is None:
            mean_D = self._sum_D / max(self._n, 1)
            centred_sq = self._sumsq / max(self._n, 1) - float(mean_D @ mean_D)
            scale = float(np.sqrt(self.d_model / max(centred_sq, 1e-12)))
            mean_D = mean_D.astype(np.float32)
        else:
            mean_D, scale = self.stats_from.mean_D.astype(np.float32), self.stats_from.scale
        np.save(self._tmp / "mean.npy", mean_D)
        self._close_files()
        files = {f"{name}.npy": f.record() for name, f in (("acts", self._acts), *self._idx.items())}
        files["mean.npy"] = file_record(self._tmp / "mean.npy")
        meta = {**self.meta, "format_version": FORMAT_VERSION, "count": self._n, "d_model": self.d_model,
                "storage_dtype": self._storage, "scale": scale, "abs_max": self._absmax,
                "files": dict(sorted(files.items()))}
        # meta.json last: a store without it is never opened.
        (self._tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def _close_files(self) -> None:
        errors = []
        for f in (self._acts, *self._idx.values()):
            try:
                f.close()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        except BaseException as e:
            with contextlib.suppress(OSError):  # the first error is the one to report
                self._close_files()
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        with contextlib.suppress(OSError):  # closed already by _finish, or an error is on its way out
            self._close_files()
        return bool(self._ctx.__exit__(exc_type, exc, tb))


class ActivationStore:
    """A complete store opened read-only; arrays are memory-mapped, nothing is loaded up front."""

    def __init__(self, path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray], mean_D: np.ndarray):
        self.path, self.meta = path, meta
        self.acts_ND, self.tokens_N, self.pos_N, self.seq_N = (arrays[n] for n in _ARRAYS)
        self.mean_D = mean_D
        self.scale = float(meta["scale"])
        self.d_model = int(meta["d_model"])
        self._mean_t = torch.from_numpy(np.ascontiguousarray(mean_D, dtype=np.float32))
        self._shift_t = self._mean_t * -self.scale  # −μ · scale: normalising is then one pass, x · scale + shift

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def seq_len(self) -> int:
        """L, the context length the store was captured with: positions run 0..L-1 (BOS, at 0, is usually
        excluded from the store). The one reader of it in the store's metadata."""
        return int(self.meta["seq_len"])

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.meta["storage_dtype"] == "bfloat16" else torch.float16

    @classmethod
    def open(cls, path: Path | str, expect_hash: str | None = None) -> "ActivationStore":
        """Open a complete store: meta.json readable, every file the size meta.json records (digests: `verify`).

        A store written before digests were recorded (no `files` in meta.json) opens unverified: its
        arrays' shapes are still checked, and recapturing is the user's call, not a surprise."""
        path = Path(path)
        meta = read_meta(path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format {meta.get('format_version')} is not {FORMAT_VERSION}. "
                             "Fix: delete the folder and capture again")
        if expect_hash is not None and meta.get("hash") != expect_hash:
            raise StoreError(f"{path}: stale store, captured with content hash {meta.get('hash')} but the config "
                             f"now hashes to {expect_hash}. Fix: run 01_capture_activations again for this config")
        for name, recorded in meta.get("files", {}).items():
            _check_size(path / name, recorded)
        N, D = int(meta["count"]), int(meta["d_model"])
        arrays = {}
        for name in _ARRAYS:
            try:
                arr = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise StoreError(f"{path / (name + '.npy')}: unreadable or truncated ({e}). "
                                 "Fix: delete the folder and capture again") from None
            want = (N, D) if name == "acts" else (N,)
            if arr.shape != want:
                raise StoreError(f"{path / (name + '.npy')}: shape {arr.shape}, meta.json says {want}. "
                                 "Fix: delete the folder and capture again")
            arrays[name] = arr
        try:
            mean_D = np.load(path / "mean.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path / 'mean.npy'}: unreadable or truncated ({e}). "
                             "Fix: delete the folder and capture again") from None
        return cls(path, meta, arrays, mean_D)

    def verify(self) -> "ActivationStore":
        """Every file's digest against meta.json's (~1 s per GB); raises naming the first that differs."""
        for name, recorded in self.meta.get("files", {}).items():
            problem = file_problem(self.path / name, recorded, where="meta.json")
            if problem:
                raise StoreError(f"{problem}. {RECAPTURE}")
        return self

    def raw(self, idx) -> torch.Tensor:
        """Raw activations of rows `idx` as float32 [len(idx), D]."""
        rows = self.acts_ND[idx]  # fancy indexing copies already; a slice is a read-only view of the memmap
        if not rows.flags.writeable:
            rows = np.array(rows)
        return torch.from_numpy(rows.view(np.int16)).view(self.storage_dtype).float()

    def normalise(self, raw_BD: torch.Tensor) -> torch.Tensor:
        """(x - μ) · scale, the SAE's input scale (docs/decisions.md §9), as x · scale − μ · scale: one pass."""
        return torch.add(self._shift_t, raw_BD, alpha=self.scale)

    def normalised(self, idx) -> torch.Tensor:
        """Normalised activations of rows `idx`, float32 [len(idx), D]: `normalise` in place on a fresh copy
        (the same numbers, without another [B, D] allocation)."""
        raw_BD = self.raw(idx)
        return torch.add(self._shift_t, raw_BD, alpha=self.scale, out=raw_BD)


def _check_size(file: Path, recorded: dict[str, Any]) -> None:
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise StoreError(f"{file}: missing, though meta.json lists it. "
                         "Fix: delete the folder and capture again") from None
    if size != recorded.get("size"):
        raise StoreError(f"{file}: unreadable or truncated ({size} bytes, meta.json records "
                         f"{recorded.get('size')}). Fix: delete the folder and capture again")


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise StoreError(f"{path}: no complete activation store here (meta.json missing). "
                         "Fix: run notebooks/01_capture_activations.ipynb for this config")
    return read_json_object(meta_path, StoreError, RECAPTURE)


def store_problem(path: Path | str, expect_hash: str | None = None) -> str | None:
    """Why `path` is not a complete, intact store of content hash `expect_hash` (the error's message), or None."""
    try:
        ActivationStore.open(path, expect_hash).verify()
    except StoreError as e:
        return str(e)
    return None


def is_complete(path: Path | str, expect_hash: str | None = None) -> bool:
    """A store is there, whole (sizes and digests as recorded), and of this content hash."""
    return store_problem(path, expect_hash) is None


def write_store(path: Path | str, acts_ND, tokens_N, pos_N, seq_N, meta: dict[str, Any],
                stats_from: ActivationStore | None = None, chunk: int = 65536) -> ActivationStore:
    """Write a whole store from in-memory arrays (tests, synthetic data)."""
    acts_ND = torch.as_tensor(np.asarray(acts_ND, dtype=np.float32))
    N, D = acts_ND.shape
    with StoreWriter(path, N, D, meta, stats_from=stats_from) as w:
        for s in range(0, N, chunk):
            w.append(acts_ND[s:s + chunk], tokens_N[s:s + chunk], pos_N[s:s + chunk], seq_N[s:s + chunk])
    return ActivationStore.open(path)


def store_settings(cfg: Config, layer: int) -> dict[str, Any]:
    """The config sections a store of `layer` depends on; saved in its meta.json, so that a reader
    (training, probes) can tell a store captured under other settings (`posae.data.store.open_layer_stores`).

    The capture section enters with `layers` replaced by this store's layer, so that adding a layer
    to the config leaves the other layers' stores valid. model.device is left out: the device asked
    for (auto, or a `--device` override) is not what the store depends on; the resolved one is, and
    `store_hash` has it.
    """
    model = {k: v for k, v in to_dict(cfg.model).items() if k != "device"}
    return {"model": model, "corpus": to_dict(cfg.corpus),
            "capture": {**to_dict(cfg.capture), "layers": [layer]}}


def capture_lock(cfg: Config) -> Path:
    """One lock per stores folder: a derived config that shares its ancestor's stores takes the ancestor's."""
    return lock_path(run_dir(cfg.stores_name) / "activations", "capture")


def open_layer_stores(cfg, split: str, layers: list[int] | None = None) -> dict[int, ActivationStore]:
    """The stores of `layers` (default: every configured layer) for `split` ('train' or 'val'),
    checked complete and captured under `cfg`'s current model, corpus and capture settings."""
    stores = {}
    with locked(capture_lock(cfg), "reading the activation stores", shared=True):  # not while a capture writes
        for layer in cfg.capture.layers if layers is None else layers:
            store = ActivationStore.open(activations_dir(cfg.stores_name, layer, split))
            check_settings(store, store_settings(cfg, layer), cfg.source)
            stores[layer] = store
    return stores


def check_settings(store: ActivationStore, settings: dict[str, Any], source: str) -> None:
    """Refuse a stale store: one whose recorded settings differ from the config's (stores written
    before settings were recorded, or by hand, carry none and pass)."""
    old = store.meta.get("settings")
    if old is None:
        return
    new = json.loads(json.dumps(settings))  # tuples as lists, as meta.json holds them
    for key, was, now in _differences(old, new, ""):
        raise StoreError(f"{store.path}: stale store: captured with {key} = {was!r}, but {source} now says {now!r}. "
                         "Fix: run notebooks/01_capture_activations.ipynb for this config (it recaptures the "
                         "stale stores only)")


def _differences(old: Any, new: Any, key: str):
    """(dotted key, old value, new value) for each leaf where two nested mappings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _differences(old.get(k), new.get(k), f"{key}.{k}" if key else k)
    elif old != new:
        yield key, old, new


def summary(stores: dict) -> "pd.DataFrame":
    """One row per store: layer, split, tokens, sequences, dtypes, normalisation scale, size on disk."""
    import pandas as pd

    rows = []
    for store in stores.values():
        store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
        m = store.meta
        rows.append({"layer": m.get("layer"), "split": m.get("split"), "tokens": len(store),
                     "sequences": len(np.unique(store.seq_N)), "d_model": store.d_model,
                     "forward dtype": m.get("forward_dtype", m.get("dtype")), "stored as": m["storage_dtype"],
                     "scale": round(store.scale, 5), "MB": round(store.acts_ND.nbytes / 2**20, 1),
                     "BOS norm": m.get("bos_norm"), "token norm": m.get("token_norm")})
    return pd.DataFrame(rows).sort_values(["layer", "split"], ascending=[True, False]).reset_index(drop=True)
