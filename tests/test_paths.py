"""Atomic writes: a file's own leftovers from a killed writer go, its neighbours' stay."""

from __future__ import annotations

from posae.paths import atomic_path, write_text_atomic


def test_atomic_write_removes_its_own_stale_temps_only(tmp_path):
    mine = tmp_path / ".table1.csv.abc123.tmp"  # what a writer of table1.csv killed mid-write leaves
    theirs = tmp_path / ".claims.csv.def456.tmp"  # another file's writer, maybe still live
    mine.write_text("half")
    theirs.write_text("half")
    write_text_atomic(tmp_path / "table1.csv", "a,b\n")
    assert (tmp_path / "table1.csv").read_text() == "a,b\n"
    assert not mine.exists() and theirs.exists()


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new, half written")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
