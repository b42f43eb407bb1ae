"""Tests for minilae.files: the one atomic writer (caches, checkpoints, metrics) and its stale temporary files."""
import errno
import os
import threading

import pytest

from minilae import files


def test_atomic_write_fsyncs_before_it_replaces(tmp_path, monkeypatch):
    """Catches a writer that skips fsync (a crash after os.replace could then leave an empty file)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    files.atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
    assert events == ["fsync", "replace"]
    assert (tmp_path / "a.json").read_bytes() == b"{}"


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    """Catches a fixed temporary name: two writers then rename each other's file away (FileNotFoundError)."""
    path, errors = tmp_path / "metrics.json", []

    def writer(i):
        try:
            for k in range(40):
                files.atomic_write(path, lambda f, i=i, k=k: f.write(f"{i} {k}\n".encode() * 2000))
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lines = set(path.read_text().splitlines())
    assert len(lines) == 1  # one writer's whole content, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path):
    """Catches an OSError from write() (a full disk) that reaches the user without saying which file."""
    def full_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left on device") as err:
        files.atomic_write(tmp_path / "checkpoint.npz", full_disk)
    assert err.value.filename == str(tmp_path / "checkpoint.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, stale", [
    (".checkpoint.npz.4242.0123456789abcdef0123456789abcdef.tmp", True),
    (".metrics.json.7.ffffffffffffffffffffffffffffffff.tmp", True),
    (".metrics.json.tmp", True),  # the fixed name of earlier versions
    (".checkpoint.npz.4242.0123456789abcdef.tmp", False),  # not a uuid4 hex
    (".checkpoint.npz.x.0123456789abcdef0123456789abcdef.tmp", False),
    (".other.npz.1.0123456789abcdef0123456789abcdef.tmp", False),  # not one of the names asked for
    ("checkpoint.npz", False),
    ("notes.tmp", False),
])
def test_stale_temp_files_matches_only_our_own_names(name, stale, tmp_path):
    """Catches a clean-up that deletes files it did not write (a user's *.tmp) or misses a killed writer's."""
    (tmp_path / name).write_bytes(b"x")
    found = files.stale_temp_files(tmp_path, ("checkpoint.npz", "metrics.json"))
    assert found == ([tmp_path / name] if stale else [])


def test_the_temporary_name_is_one_stale_temp_files_finds(tmp_path, monkeypatch):
    """Ties the two together: the name atomic_write writes is the one the clean-up removes."""
    seen = []

    def write(f):
        seen.extend(files.stale_temp_files(tmp_path, ("run.npz",)))

    files.atomic_write(tmp_path / "run.npz", write)
    assert len(seen) == 1 and seen[0].name.startswith(".run.npz.")
