"""Tests of minilae.data and the datasets.py command.

Real-data tests read the raw files from $MINILAE_DATA (CI sets it); without them they are
skipped with a visible reason, and fail under CI=true (conftest.require_data). Nothing here touches the network: downloads are tested
with a fake ``urlopen`` / fake torchvision, and the offline path with one that fails.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import shutil
import stat
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data

from minilae import data

pytestmark = pytest.mark.backends("numpy")  # host-side file parsing: no arrays on a backend

REPO = Path(__file__).resolve().parents[1]
NAMES = ["mnist", "fashionmnist"]
FILES = [fname for fname, _, _ in data.PARTS.values()]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def real_root(real_data_root) -> Path:
    return real_data_root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("minilae-cache")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # ~110 MB of caches; pytest would keep them around


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, session_cache, tmp_path):
    """Never write caches to the user's ~/.cache during tests; drop each test's large copies after it."""
    monkeypatch.setenv(data.ENV_CACHE, str(session_cache))
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def splits(real_root, session_cache):
    """All splits of both datasets, loaded once for the session."""
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before the autouse one
        mp.setenv(data.ENV_CACHE, str(session_cache))
        return {name: data.load_splits(name, real_root) for name in NAMES}


def copy_raw(real_root: Path, dst_root: Path, name: str = "MNIST") -> Path:
    """Copy one dataset's four raw files into dst_root/<name>/raw; return that folder."""
    folder = dst_root / name / "raw"
    folder.mkdir(parents=True)
    for fname in FILES:
        shutil.copyfile(real_root / name / "raw" / fname, folder / fname)
    return folder


@pytest.fixture
def read_only():
    """chmod folders to r-x (read-only even for root, see data._is_writable); restored afterwards."""
    folders = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        folders.append(folder)
        return folder

    yield make
    for folder in folders:
        folder.chmod(stat.S_IRWXU)


def flip_byte(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))


def count_parses(monkeypatch) -> list:
    """Wrap data._parse_raw so a test can see how often the gz files were parsed."""
    calls = []
    original = data._parse_raw

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(data, "_parse_raw", counting)
    return calls


def load_cli():
    spec = importlib.util.spec_from_file_location("minilae_datasets_cli", REPO / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- real data: contents


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split, n", [("train", 55000), ("val", 5000), ("test", 10000)])
def test_split_shapes_dtypes_range_labels(splits, name, split, n):
    assert n == {"train": data.N_TRAIN_FILE - data.N_VAL, "val": data.N_VAL, "test": data.N_TEST}[split]
    x, y = splits[name][split]
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(np.unique(y), np.arange(10))


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_the_raw_files_scaled_train_then_val(real_root, splits, name):
    folder = data.raw_dir(name, real_root)
    train_images = data.read_idx(folder / "train-images-idx3-ubyte.gz")
    train_labels = data.read_idx(folder / "train-labels-idx1-ubyte.gz")
    test_images = data.read_idx(folder / "t10k-images-idx3-ubyte.gz")
    n_train = len(train_images) - data.N_VAL
    expected = {
        "train": (train_images[:n_train], train_labels[:n_train]),
        "val": (train_images[n_train:], train_labels[n_train:]),
        "test": (test_images, None),
    }
    for split, (images, labels) in expected.items():
        x, y = splits[name][split]
        np.testing.assert_array_equal(x[:, 0], images.astype(np.float32) / np.float32(255))
        if labels is not None:
            np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", data.SPLITS)
def test_load_dataset_equals_load_splits(real_root, splits, name, split):
    x, y = data.load_dataset(name.upper(), split, root=real_root)
    np.testing.assert_array_equal(x, splits[name][split][0])
    np.testing.assert_array_equal(y, splits[name][split][1])


def test_mnist_and_fashionmnist_differ(splits):
    for split in data.SPLITS:
        assert not np.array_equal(splits["mnist"][split][0], splits["fashionmnist"][split][0])
    assert data.SHA256["MNIST"].keys() == data.SHA256["FashionMNIST"].keys()
    assert not set(data.SHA256["MNIST"].values()) & set(data.SHA256["FashionMNIST"].values())


def test_root_from_env(monkeypatch, real_root, splits):
    monkeypatch.setenv(data.ENV_DATA, str(real_root))
    x, y = data.load_dataset("mnist", "val")
    np.testing.assert_array_equal(x, splits["mnist"]["val"][0])


@pytest.mark.parametrize("name", NAMES)
def test_verify_files_returns_the_published_hashes(real_root, name):
    assert data.verify_files(name, real_root) == data.SHA256[data.canonical_name(name)]


# ---------------------------------------------------------------- roots and names


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(data.ENV_DATA, raising=False)
    monkeypatch.delenv(data.ENV_CACHE, raising=False)
    assert data.data_root() == tmp_path / "home" / ".cache" / "minilae" / "data"
    assert data.cache_root() == tmp_path / "home" / ".cache" / "minilae"
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path / "env"))
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path / "cache"))
    assert data.data_root() == tmp_path / "env"
    assert data.cache_root() == tmp_path / "cache"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.raw_dir("Fashion-MNIST", tmp_path) == tmp_path / "FashionMNIST" / "raw"


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("MNIST", "MNIST"), ("FashionMNIST", "FashionMNIST"),
                                          ("fashion_mnist", "FashionMNIST"), ("Fashion-MNIST", "FashionMNIST")])
def test_canonical_name(name, folder):
    assert data.canonical_name(name) == folder


@pytest.mark.parametrize("bad", ["cifar10", "", "mnist2"])
def test_unknown_dataset_name_lists_options(bad, tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset .*fashionmnist, mnist"):
        data.load_dataset(bad, root=tmp_path)


def test_bad_split_and_name_type(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'; choose one of train, val, test"):
        data.load_dataset("mnist", "validation", root=tmp_path)
    with pytest.raises(TypeError, match="dataset name must be a string"):
        data.load_dataset(3, root=tmp_path)


# ---------------------------------------------------------------- missing and corrupt files


def test_missing_files_error_names_every_file_root_env_and_command(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(data.MissingDataError) as info:
        data.load_dataset("mnist", root=root)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, data.DataError)
    message = str(info.value)
    for fname in FILES:
        assert str(root / "MNIST" / "raw" / fname) in message
    assert str(root) in message and data.ENV_DATA in message
    assert f"python datasets.py --root {root} --dataset mnist" in message


def test_missing_error_lists_only_the_missing_file(real_root, tmp_path):
    folder = copy_raw(real_root, tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.MissingDataError, match="1 raw file") as info:
        data.verify_files("mnist", tmp_path)
    assert str(folder / "t10k-labels-idx1-ubyte.gz") in str(info.value)
    assert "t10k-images" not in str(info.value)


@pytest.mark.parametrize("fname", ["train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"])
def test_corrupt_file_raises_checksum_error_with_both_hashes(real_root, tmp_path, fname):
    folder = copy_raw(real_root, tmp_path)
    flip_byte(folder / fname, 1000)
    actual = hashlib.sha256((folder / fname).read_bytes()).hexdigest()
    with pytest.raises(data.ChecksumError) as info:
        data.load_dataset("mnist", "test", root=tmp_path)
    message = str(info.value)
    assert str(folder / fname) in message
    assert data.SHA256["MNIST"][fname] in message and actual in message
    assert sum(f in message for f in FILES) == 1  # only the corrupt file is named


def test_a_valid_cache_never_hides_a_corrupted_raw_file(real_root, tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path / "cache"))
    folder = copy_raw(real_root, tmp_path)
    data.load_dataset("mnist", "val", root=tmp_path)
    assert any(p.is_file() for p in data.cache_paths("mnist", tmp_path))
    flip_byte(folder / "train-images-idx3-ubyte.gz", 5000)
    with pytest.raises(data.ChecksumError, match=r"corrupt \(checksum mismatch\)(.|\n)*train-images-idx3-ubyte\.gz"):
        data.load_dataset("mnist", "val", root=tmp_path)


# ---------------------------------------------------------------- cache


def test_cache_goes_to_MINILAE_CACHE_when_raw_folder_is_read_only_and_is_reused(
        real_root, splits, tmp_path, monkeypatch, read_only):
    cache = tmp_path / "cache"
    monkeypatch.setenv(data.ENV_CACHE, str(cache))
    read_only(copy_raw(real_root, tmp_path / "data"))
    beside, in_cache = data.cache_paths("mnist", tmp_path / "data")
    assert in_cache.parent == cache
    calls = count_parses(monkeypatch)

    first = data.load_dataset("mnist", "val", root=tmp_path / "data")
    assert len(calls) == 1 and in_cache.is_file() and not beside.exists()
    mtime = in_cache.stat().st_mtime_ns
    second = data.load_dataset("mnist", "val", root=tmp_path / "data")
    assert len(calls) == 1 and in_cache.stat().st_mtime_ns == mtime
    for a, b, ref in zip(first, second, splits["mnist"]["val"], strict=True):
        np.testing.assert_array_equal(a, ref)
        np.testing.assert_array_equal(b, ref)
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]


def test_cache_is_written_beside_writable_raw_files(real_root, splits, tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path / "cache"))
    folder = copy_raw(real_root, tmp_path / "data")
    calls = count_parses(monkeypatch)
    data.load_dataset("mnist", "test", root=tmp_path / "data")
    x, y = data.load_dataset("mnist", "test", root=tmp_path / "data")
    beside, in_cache = data.cache_paths("mnist", tmp_path / "data")
    assert len(calls) == 1 and beside.parent == folder and beside.is_file() and not in_cache.exists()
    np.testing.assert_array_equal(x, splits["mnist"]["test"][0])
    np.testing.assert_array_equal(y, splits["mnist"]["test"][1])
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES + [beside.name])  # no temp files left


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a zip file at all")


def _flip_middle(path: Path) -> None:
    flip_byte(path, path.stat().st_size // 2)  # inside train_images: zip CRC must catch it


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _wrong_key(path: Path) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["key"] = np.array("0" * 16)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _wrong_shape(path: Path) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_images"] = arrays["test_images"][:-1]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("spoil", [_garbage, _flip_middle, _truncate, _wrong_key, _wrong_shape])
def test_stale_or_corrupt_cache_is_ignored_and_rebuilt(real_root, splits, tmp_path, monkeypatch, spoil):
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path / "cache"))  # the session cache would be valid too
    folder = copy_raw(real_root, tmp_path)
    data.load_dataset("mnist", "test", root=tmp_path)
    cache_file = data.cache_paths("mnist", tmp_path)[0]
    key = data._cache_key("MNIST", data.SHA256["MNIST"])
    assert data._read_cache(cache_file, key) is not None
    spoil(cache_file)
    assert data._read_cache(cache_file, key) is None
    calls = count_parses(monkeypatch)
    x, y = data.load_dataset("mnist", "test", root=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(x, splits["mnist"]["test"][0])
    np.testing.assert_array_equal(y, splits["mnist"]["test"][1])
    assert data._read_cache(cache_file, key) is not None  # rewritten whole
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]


def test_unwritable_cache_warns_but_loads(real_root, splits, tmp_path, monkeypatch, read_only):
    read_only(copy_raw(real_root, tmp_path / "data"))
    monkeypatch.setenv(data.ENV_CACHE, str(read_only(tmp_path / "cache")))
    with pytest.warns(UserWarning, match="could not write a dataset cache"):
        x, _ = data.load_dataset("mnist", "val", root=tmp_path / "data")
    np.testing.assert_array_equal(x, splits["mnist"]["val"][0])


# ---------------------------------------------------------------- IDX parser (synthetic files)


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.dtype(data.IDX_DTYPES[type_code])).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


@pytest.mark.parametrize("type_code", sorted(data.IDX_DTYPES), ids=lambda c: data.IDX_DTYPES[c])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 1, 3, 2)], ids=str)
def test_read_idx_round_trip(tmp_path, type_code, shape):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 100, size=shape).astype(data.IDX_DTYPES[type_code])
    path = write_gz(tmp_path / "a.gz", idx_bytes(array, type_code))
    out = data.read_idx(path, expected_magic=(type_code << 8) | len(shape))
    assert out.shape == shape and out.dtype.isnative and out.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic_names_file_and_numbers(tmp_path):
    labels = np.arange(5, dtype=np.uint8)
    path = write_gz(tmp_path / "labels.gz", idx_bytes(labels, 0x08))  # magic 2049
    with pytest.raises(data.IDXFormatError, match=r"labels\.gz: bad IDX magic number 2049 .*expected 2051"):
        data.read_idx(path, expected_magic=2051)


@pytest.mark.parametrize("payload, message", [
    (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x02" + b"ab", "not an IDX file"),  # non-zero leading bytes
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x02" + b"ab", "not an IDX file"),  # unknown type code
    (b"\x00\x00", "too short"),
    (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02", "announces 3 dimensions"),
    (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"abc", r"shape \(5,\).*but the file has 11 bytes"),
    (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x02" + b"abc", r"shape \(2,\).*but the file has 11 bytes"),
])
def test_parse_idx_rejects_malformed_headers(tmp_path, payload, message):
    path = write_gz(tmp_path / "bad.gz", payload)
    with pytest.raises(data.IDXFormatError, match=message):
        data.read_idx(path)


def test_read_idx_rejects_non_gzip_and_missing_files(tmp_path):
    (tmp_path / "plain").write_bytes(idx_bytes(np.arange(4, dtype=np.uint8), 0x08))
    with pytest.raises(data.IDXFormatError, match="not a readable gzip file"):
        data.read_idx(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="No such file.*absent.gz"):
        data.read_idx(tmp_path / "absent.gz")


# ---------------------------------------------------------------- minibatches


@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (5, 8), (1, 1), (0, 2)])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_every_index_once(n, batch_size, shuffle, drop_last):
    x = np.arange(n)
    got = list(data.batches(x, batch_size, rng=0, shuffle=shuffle, drop_last=drop_last))
    n_full = n // batch_size
    assert len(got) == data.n_batches(n, batch_size, drop_last)
    assert [len(b) for b in got[:n_full]] == [batch_size] * n_full
    seen = np.concatenate(got) if got else np.array([], int)
    assert len(seen) == len(np.unique(seen))  # nothing twice
    if drop_last:
        assert len(seen) == n_full * batch_size
    else:
        np.testing.assert_array_equal(np.sort(seen), x)  # everything once
    if not shuffle:
        np.testing.assert_array_equal(seen, x[: len(seen)])


def test_batches_respect_the_seed():
    x = np.arange(100)

    def order(rng):
        return np.concatenate(list(data.batches(x, 7, rng=rng)))

    np.testing.assert_array_equal(order(3), order(3))
    np.testing.assert_array_equal(order(np.random.default_rng(3)), order(3))
    assert not np.array_equal(order(3), order(4))
    assert not np.array_equal(order(3), x)
    gen = np.random.default_rng(5)
    assert not np.array_equal(order(gen), order(gen))  # a Generator advances between epochs


def test_batches_keep_tuples_aligned():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(23, 1, 2, 2))
    y = np.arange(23)
    for xb, yb in data.batches((x, y), 5, rng=2):
        np.testing.assert_array_equal(xb, x[yb])


@pytest.mark.parametrize("args, error, message", [
    ((np.arange(4), 0), ValueError, "batch_size must be a positive integer"),
    ((np.arange(4), 2.0), ValueError, "batch_size must be a positive integer"),
    ((np.arange(4), True), ValueError, "batch_size must be a positive integer"),
    (([0, 1, 2], 2), TypeError, "NumPy array"),
    (((np.arange(4), np.arange(5)), 2), ValueError, r"same length, got \[4, 5\]"),
    ((np.float64(1.0), 2), TypeError, "leading batch axis"),
])
def test_batches_reject_bad_input_eagerly(args, error, message):
    with pytest.raises(error, match=message):
        data.batches(*args)  # raised at the call, not at the first next()


def test_batches_reject_bad_rng():
    with pytest.raises(TypeError, match="rng must be None, an int seed or a numpy.random.Generator"):
        data.batches(np.arange(4), 2, rng="seed")


# ---------------------------------------------------------------- download (no network)


@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision...` raise
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)


@pytest.fixture
def offline(monkeypatch, no_torchvision):
    urls = []

    def fail(url, *args, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    return urls


def fake_server(monkeypatch, real_root, spoil_mirrors=()):
    """urlopen that serves the real files (from real_root), corrupted on the given mirrors."""
    urls = []

    def serve(url, *args, **kwargs):
        urls.append(url)
        mirror, fname = url.rsplit("/", 1)
        name = next(n for n, ms in data.MIRRORS.items() if mirror + "/" in ms)
        payload = (real_root / name / "raw" / fname).read_bytes()
        if mirror + "/" in spoil_mirrors:
            payload = payload[:-1] + bytes([payload[-1] ^ 1])
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    return urls


def test_download_offline_names_files_and_where_to_put_them(tmp_path, offline):
    with pytest.raises(data.DownloadError) as info:
        data.download("fashionmnist", tmp_path, log=lambda *_: None)
    message = str(info.value)
    folder = tmp_path / "FashionMNIST" / "raw"
    for fname in FILES:
        assert str(folder / fname) in message and data.SHA256["FashionMNIST"][fname] in message
    assert "torchvision is not installed" in message and "Temporary failure" in message
    assert "python datasets.py --root" in message
    assert len(offline) == len(FILES) * len(data.MIRRORS["FashionMNIST"])
    assert list(folder.iterdir()) == []  # nothing half-written


def test_cli_offline_exits_1_with_the_message(tmp_path, offline, capsys):
    assert load_cli().main(["--root", str(tmp_path), "--dataset", "mnist"]) == 1
    err = capsys.readouterr().err
    assert "could not download 4 file(s)" in err
    assert str(tmp_path / "MNIST" / "raw" / FILES[0]) in err


def test_download_over_http_writes_verified_files(real_root, tmp_path, monkeypatch, no_torchvision):
    urls = fake_server(monkeypatch, real_root)
    logged = []
    folder = data.download("mnist", tmp_path, log=logged.append)
    assert folder == tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert data.verify_files("mnist", tmp_path) == data.SHA256["MNIST"]
    assert urls == [data.MIRRORS["MNIST"][0] + f for f in FILES] and len(logged) == len(FILES)
    assert data.download("mnist", tmp_path, log=logged.append) == folder  # present: no new requests
    assert len(urls) == len(FILES)


def test_download_skips_a_mirror_serving_corrupt_bytes(real_root, tmp_path, monkeypatch, no_torchvision):
    first, second = data.MIRRORS["MNIST"][:2]
    urls = fake_server(monkeypatch, real_root, spoil_mirrors=(first,))
    data.download("mnist", tmp_path, log=lambda *_: None)
    assert data.verify_files("mnist", tmp_path) == data.SHA256["MNIST"]
    assert urls == [m + f for f in FILES for m in (first, second)]


def test_download_replaces_a_corrupt_file_and_rejects_corrupt_mirrors(real_root, tmp_path, monkeypatch,
                                                                       no_torchvision):
    folder = copy_raw(real_root, tmp_path)
    flip_byte(folder / FILES[1], 100)
    fake_server(monkeypatch, real_root, spoil_mirrors=data.MIRRORS["MNIST"])
    with pytest.raises(data.DownloadError, match="expected sha256") as info:
        data.download("mnist", tmp_path, log=lambda *_: None)
    assert str(folder / FILES[1]) in str(info.value) and str(folder / FILES[0]) not in str(info.value)
    urls = fake_server(monkeypatch, real_root)
    data.download("mnist", tmp_path, log=lambda *_: None)
    assert urls == [data.MIRRORS["MNIST"][0] + FILES[1]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)


def test_download_uses_torchvision_when_installed(real_root, tmp_path, monkeypatch):
    calls = []

    def fake_dataset(name):
        def make(root, train=True, download=False):
            calls.append((name, root, train, download))
            folder = Path(root) / name / "raw"
            if not folder.exists():
                shutil.copytree(real_root / name / "raw", folder)
        return make

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(MNIST=fake_dataset("MNIST"), FashionMNIST=fake_dataset("FashionMNIST"))
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", tv.datasets)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("HTTP used despite torchvision"))
    folder = data.download("FashionMNIST", tmp_path, log=lambda *_: None)
    assert calls and all(c[0] == "FashionMNIST" and c[1] == str(tmp_path) and c[3] for c in calls)
    assert data.verify_files("fashionmnist", tmp_path) == data.SHA256["FashionMNIST"]
    assert folder == tmp_path / "FashionMNIST" / "raw"


# ---------------------------------------------------------------- datasets.py command


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        load_cli().main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--root", "--dataset", "--verify-only", data.ENV_DATA, "mnist", "fashionmnist"]:
        assert flag in out


def test_cli_verify_only(real_root, tmp_path, capsys):
    cli = load_cli()
    assert cli.main(["--root", str(real_root), "--verify-only"]) == 0
    assert capsys.readouterr().out.count(": OK") == 2
    assert cli.main(["--root", str(tmp_path), "--verify-only", "--dataset", "MNIST"]) == 1
    assert "python datasets.py --root" in capsys.readouterr().err


def test_cli_rejects_unknown_dataset(capsys):
    with pytest.raises(SystemExit) as info:
        load_cli().main(["--dataset", "cifar10"])
    assert info.value.code == 2
    assert "invalid choice: 'cifar10'" in capsys.readouterr().err


# ---------------------------------------------------------------- the real-data rule (conftest)


def fake_data_root(tmp_path, folders):
    for name in folders:
        (tmp_path / name / "raw").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("folders, env_set, named", [
    ([], False, r"\$MINILAE_DATA is not set"),
    (["MNIST"], True, r"has no FashionMNIST/raw"),
    ([], True, r"has no MNIST/raw or FashionMNIST/raw"),
])
@pytest.mark.parametrize("ci", [None, "true"])
def test_missing_real_data_skips_with_the_reason_and_fails_in_ci(folders, env_set, named, ci, tmp_path, monkeypatch):
    """Bugs caught: a silent skip in CI (the real-data checks would never run there) and a reason
    that does not say what is missing."""
    root = fake_data_root(tmp_path, folders)
    if env_set:
        monkeypatch.setenv(data.ENV_DATA, str(root))
    else:
        monkeypatch.delenv(data.ENV_DATA, raising=False)
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    # catch both outcomes, so that a skip where a failure is due cannot skip this test itself
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception),
                       match=named + (".*CI=true, so missing data is an error" if ci else "")) as outcome:
        require_data()
    assert outcome.type is (pytest.fail.Exception if ci else pytest.skip.Exception)


def test_present_real_data_is_returned(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_DATA, str(fake_data_root(tmp_path, ["MNIST", "FashionMNIST"])))
    monkeypatch.setenv("CI", "true")
    assert require_data() == tmp_path
