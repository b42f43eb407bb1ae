"""MNIST and FashionMNIST, the two datasets of the paper, read from torchvision's raw files.

Layout on disk (what ``torchvision.datasets.MNIST(root, download=True)`` produces)::

    <root>/MNIST/raw/train-images-idx3-ubyte.gz   <root>/FashionMNIST/raw/...
    <root>/MNIST/raw/train-labels-idx1-ubyte.gz
    <root>/MNIST/raw/t10k-images-idx3-ubyte.gz
    <root>/MNIST/raw/t10k-labels-idx1-ubyte.gz

``root`` is the explicit argument, else the environment variable ``MINILAE_DATA``, else
``~/.cache/minilae/data``. Fetch the files with ``python datasets.py --root ROOT``.

Every load checks the SHA-256 of the four raw files against :data:`SHA256` (the public
torchvision files), so a corrupted or substituted file is never used.

Splits (as in the paper): the 60000 training images are split into ``train`` (the first
55000) and ``val`` (the last :data:`N_VAL` = 5000); ``test`` is the 10000-image test file.
Images come back as float32 in [0, 1] with shape (N, 1, 28, 28) (NCHW), labels as int64.

Decompressing and parsing the gz files takes about a second, so the parsed uint8 arrays are
cached as an ``.npz`` file: beside the raw files when that folder is writable (one with no
write permission bits counts as read-only, even for root), else in ``MINILAE_CACHE``
(default ``~/.cache/minilae``). The cache name carries a key made of the
raw files' checksums; a cache whose stored key, shapes or zip CRCs do not match is ignored
and rebuilt, and caches are written atomically (temporary file + ``os.replace``).

Everything here runs on the host with NumPy (file parsing); the trainer moves each batch to
the array backend explicitly with :func:`minilae.backend.asarray`.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np  # host-side file parsing only, allowed by the style guide

from .files import atomic_write as _atomic_write
from .files import is_writable as _is_writable

ENV_DATA = "MINILAE_DATA"
ENV_CACHE = "MINILAE_CACHE"
DEFAULT_DATA_ROOT = "~/.cache/minilae/data"
DEFAULT_CACHE_ROOT = "~/.cache/minilae"

DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}  # accepted name -> folder
SPLITS = ("train", "val", "test")
N_TRAIN_FILE = 60000  # images in the train-* files, before the validation hold-out
N_TEST = 10000
N_VAL = 5000  # last N_VAL training images form the validation split (paper: 55000/5000/10000)
IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10

# part -> (file name, IDX magic number, number of items)
PARTS = {
    "train_images": ("train-images-idx3-ubyte.gz", 2051, N_TRAIN_FILE),
    "train_labels": ("train-labels-idx1-ubyte.gz", 2049, N_TRAIN_FILE),
    "test_images": ("t10k-images-idx3-ubyte.gz", 2051, N_TEST),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", 2049, N_TEST),
}

SHA256 = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# Public mirrors, tried in order (the first is the one torchvision uses).
MIRRORS = {
    "MNIST": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "FashionMNIST": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# IDX type byte -> big-endian NumPy dtype (the format spec of LeCun's MNIST page).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

CACHE_VERSION = "1"  # bump when the cache layout changes; it is part of the cache key


class DataError(Exception):
    """Base class of every dataset problem (missing, corrupt, malformed, undownloadable)."""


class MissingDataError(DataError, FileNotFoundError):
    """Raised when raw dataset files are absent; the message says how to fetch them."""


class ChecksumError(DataError, ValueError):
    """Raised when a raw file's SHA-256 differs from the published one."""


class IDXFormatError(DataError, ValueError):
    """Raised when a file is not a well-formed (gzipped) IDX file of the expected kind."""


class DownloadError(DataError):
    """Raised when the raw files could not be fetched (e.g. no internet)."""


# ---------------------------------------------------------------- names and folders


def canonical_name(name: str) -> str:
    """Folder name of a dataset ('MNIST' or 'FashionMNIST'); case, '-' and '_' are ignored."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def data_root(root=None) -> Path:
    """Data root: the argument, else $MINILAE_DATA, else ~/.cache/minilae/data."""
    chosen = root if root is not None else os.environ.get(ENV_DATA) or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser().absolute()


def cache_root() -> Path:
    """Fallback cache folder: $MINILAE_CACHE, else ~/.cache/minilae."""
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE_ROOT).expanduser().absolute()


def raw_dir(name: str, root=None) -> Path:
    """Folder holding a dataset's raw files: <root>/<Name>/raw."""
    return data_root(root) / canonical_name(name) / "raw"


def download_command(name: str, root=None) -> str:
    """Shell command that fetches a dataset into root."""
    return f"python datasets.py --root {data_root(root)} --dataset {canonical_name(name).lower()}"


# ---------------------------------------------------------------- checksums


def sha256_file(path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(name: str, root: Path, missing: list[Path]) -> str:
    listing = "\n".join(f"  - {p}" for p in missing)
    return (
        f"{name}: {len(missing)} raw file(s) not found under data root {root}:\n{listing}\n"
        f"The data root is the `root` argument, else ${ENV_DATA}, else {DEFAULT_DATA_ROOT}.\n"
        f"Download them with:  {download_command(name, root)}\n"
        f"(or torchvision.datasets.{name}({str(root)!r}, download=True), which makes the same layout)."
    )


def verify_files(name: str, root=None) -> dict[str, str]:
    """Check the four raw files exist and match SHA256; return {file name: sha256}."""
    name = canonical_name(name)
    root = data_root(root)
    folder = root / name / "raw"
    files = [folder / fname for fname, _, _ in PARTS.values()]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise MissingDataError(_missing_message(name, root, missing))
    hashes = {p.name: sha256_file(p) for p in files}
    bad = [p for p in files if hashes[p.name] != SHA256[name][p.name]]
    if bad:
        lines = "\n".join(
            f"  - {p}\n      expected sha256 {SHA256[name][p.name]}\n      actual   sha256 {hashes[p.name]}"
            for p in bad
        )
        raise ChecksumError(
            f"{name}: {len(bad)} raw file(s) are corrupt (checksum mismatch):\n{lines}\n"
            f"Delete them and download again:  {download_command(name, root)}"
        )
    return hashes


# ---------------------------------------------------------------- IDX format


def parse_idx(buffer, expected_magic=None, source: str = "<bytes>") -> np.ndarray:
    """Decode an (uncompressed) IDX buffer: magic = 0x0000 | type | ndim, dims (u32 BE), data."""
    buffer = memoryview(buffer).cast("B")
    if len(buffer) < 4:
        raise IDXFormatError(f"{source}: {len(buffer)} bytes is too short for an IDX header")
    magic = int.from_bytes(buffer[:4], "big")
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise IDXFormatError(f"{source}: bad IDX magic number {magic} (0x{magic:08x}); expected {expected_magic}")
    if zero != 0 or type_code not in IDX_DTYPES:
        raise IDXFormatError(f"{source}: bad IDX magic number 0x{magic:08x}; not an IDX file")
    header = 4 + 4 * ndim
    if len(buffer) < header:
        raise IDXFormatError(f"{source}: header announces {ndim} dimensions but the file is {len(buffer)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(buffer, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected_bytes = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected_bytes:
        raise IDXFormatError(
            f"{source}: header says shape {shape} of {dtype.name} ({expected_bytes} bytes in all) "
            f"but the file has {len(buffer)} bytes"
        )
    data = np.frombuffer(buffer, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path, expected_magic=None) -> np.ndarray:
    """Read a gzipped IDX file into a NumPy array (see parse_idx)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        if isinstance(err, FileNotFoundError):
            raise
        raise IDXFormatError(f"{path}: not a readable gzip file ({err})") from err
    return parse_idx(raw, expected_magic, source=str(path))


def _parse_raw(name: str, folder: Path) -> dict[str, np.ndarray]:
    """Parse the four raw files into uint8 arrays, checking magic numbers and sizes."""
    parts = {}
    for part, (fname, magic, n_items) in PARTS.items():
        arr = read_idx(folder / fname, expected_magic=magic)
        want = (n_items, *IMAGE_SHAPE[1:]) if part.endswith("images") else (n_items,)
        if arr.shape != want:
            raise IDXFormatError(f"{folder / fname}: shape {arr.shape}, expected {want} for {name}")
        parts[part] = arr.reshape(n_items, *IMAGE_SHAPE) if part.endswith("images") else arr
    for part in ("train_labels", "test_labels"):
        if parts[part].max() >= N_CLASSES:
            raise IDXFormatError(f"{name} {part}: labels must lie in 0..{N_CLASSES - 1}")
    return parts


# ---------------------------------------------------------------- cache


def _cache_key(name: str, hashes: dict[str, str]) -> str:
    text = "|".join([CACHE_VERSION, name] + [hashes[fname] for fname, _, _ in PARTS.values()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_paths(name: str, root=None, key: str | None = None) -> list[Path]:
    """Where a dataset's cache may live, in lookup order: beside the raw files, then MINILAE_CACHE."""
    name = canonical_name(name)
    key = key if key is not None else _cache_key(name, SHA256[name])
    fname = f"minilae-{name}-{key}.npz"
    return [raw_dir(name, root) / fname, cache_root() / fname]


def _expected_shapes() -> dict[str, tuple]:
    return {
        part: (n, *IMAGE_SHAPE) if part.endswith("images") else (n,)
        for part, (_, _, n) in PARTS.items()
    }


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """Arrays from a cache file, or None when it is absent, stale or corrupt."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            parts = {part: z[part] for part in PARTS}  # reading checks each member's zip CRC
    except Exception:  # noqa: BLE001 - any unreadable cache is simply rebuilt
        return None
    shapes = _expected_shapes()
    if any(parts[p].dtype != np.uint8 or parts[p].shape != shapes[p] for p in PARTS):
        return None
    return parts


def _write_cache(paths: list[Path], key: str, parts: dict[str, np.ndarray]) -> Path | None:
    """Write the cache to the first writable location; return it (None if none was writable)."""
    errors = []
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not _is_writable(path.parent):
                raise PermissionError(f"{path.parent} is not writable")
            _atomic_write(path, lambda f: np.savez(f, key=np.array(key), **parts))
            return path
        except OSError as err:
            errors.append(f"{path}: {err}")
    message = "could not write a dataset cache (loading stays correct but slow):\n" + "\n".join(errors)
    warnings.warn(message, stacklevel=4)  # point at the caller of load_dataset / load_splits
    return None


def _load_raw(name: str, root=None) -> dict[str, np.ndarray]:
    """Verified uint8 arrays of a dataset (train/test images and labels), from cache if valid."""
    name = canonical_name(name)
    hashes = verify_files(name, root)  # every load checks the raw files, so a cache is never stale
    key = _cache_key(name, hashes)
    paths = cache_paths(name, root, key)
    for path in paths:
        parts = _read_cache(path, key)
        if parts is not None:
            return parts
    parts = _parse_raw(name, raw_dir(name, root))
    _write_cache(paths, key, parts)
    return parts


# ---------------------------------------------------------------- public loading


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]: x / 255."""
    return np.divide(images, np.float32(255), dtype=np.float32)


def _split_slice(split: str) -> tuple[str, slice]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test":
        return "test", slice(None)
    n_train = N_TRAIN_FILE - N_VAL
    return "train", slice(0, n_train) if split == "train" else slice(n_train, N_TRAIN_FILE)


def load_splits(name: str, root=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All three splits {'train','val','test': (images (N,1,28,28) float32 in [0,1], labels int64)}."""
    parts = _load_raw(name, root)
    out = {}
    for split in SPLITS:
        source, sl = _split_slice(split)
        out[split] = _to_unit_float(parts[f"{source}_images"][sl]), parts[f"{source}_labels"][sl].astype(np.int64)
    return out


def load_dataset(name: str, split: str = "train", root=None) -> tuple[np.ndarray, np.ndarray]:
    """One split as host arrays: images (N,1,28,28) float32 in [0,1], labels (N,) int64."""
    name = canonical_name(name)
    source, sl = _split_slice(split)
    parts = _load_raw(name, root)
    return _to_unit_float(parts[f"{source}_images"][sl]), parts[f"{source}_labels"][sl].astype(np.int64)


# ---------------------------------------------------------------- minibatches


def n_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of minibatches per epoch: ceil(n / B), or floor(n / B) with drop_last."""
    return n // batch_size if drop_last else -(-n // batch_size)


def _as_generator(rng) -> np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def batches(x, batch_size: int, rng=None, shuffle: bool = True, drop_last: bool = False):
    """Iterate one epoch of minibatches x[perm[k*B:(k+1)*B]]; x may be an array or a tuple of arrays.

    Every row appears exactly once per epoch (except the final short batch with drop_last).
    With ``shuffle`` the order is ``rng.permutation(N)`` (``rng``: None, int seed or Generator);
    without it batches are contiguous views. Yields host arrays (a tuple if x was a tuple).
    """
    arrays = x if isinstance(x, tuple) else (x,)
    if not arrays or not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in arrays):
        raise TypeError("x must be a NumPy array or a tuple of NumPy arrays with a leading batch axis")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays in x must have the same length, got {[len(a) for a in arrays]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = _as_generator(rng).permutation(n) if shuffle else None
    stop = n_batches(n, batch_size, drop_last) * batch_size

    def epoch():
        for start in range(0, stop, batch_size):
            sl = slice(start, min(start + batch_size, n))
            idx = order[sl] if order is not None else sl
            batch = tuple(a[idx] for a in arrays)
            yield batch if isinstance(x, tuple) else batch[0]

    return epoch()


# ---------------------------------------------------------------- download


def _files_to_fetch(name: str, folder: Path) -> list[str]:
    """Raw file names that are absent or fail their checksum."""
    return [f for f, _, _ in PARTS.values() if not (folder / f).is_file() or sha256_file(folder / f) != SHA256[name][f]]


def _fetch_torchvision(name: str, root: Path, log) -> str | None:
    """Let torchvision download into root; return a reason string when it could not."""
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415 - optional dependency
    except ImportError:
        return "torchvision is not installed"
    try:
        getattr(tvd, name)(str(root), train=True, download=True)
        getattr(tvd, name)(str(root), train=False, download=True)
    except Exception as err:  # noqa: BLE001 - any failure falls back to plain HTTP
        return f"torchvision failed: {err}"
    log(f"{name}: downloaded with torchvision")
    return None


def _download_verified(url: str, path: Path, expected: str) -> None:
    """Stream url into path atomically, refusing content whose SHA-256 is not `expected`."""

    def write(f):
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != expected:  # checked before the replace: a bad file never lands
            raise ChecksumError(f"expected sha256 {expected}, got {digest.hexdigest()}")

    _atomic_write(path, write)


def _fetch_http(name: str, fname: str, folder: Path, log) -> list[str]:
    """Download one file from the first mirror that serves it intact; return the failures."""
    failures = []
    for mirror in MIRRORS[name]:
        url = mirror + fname
        try:
            _download_verified(url, folder / fname, SHA256[name][fname])
        except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, timeouts, checksum
            failures.append(f"{url}: {err}")
            continue
        log(f"{name}: downloaded {url}")
        return []
    return failures


def download(name: str, root=None, log=print) -> Path:
    """Fetch a dataset's raw files into <root>/<Name>/raw (torchvision, else HTTP) and verify them."""
    name = canonical_name(name)
    root = data_root(root)
    folder = root / name / "raw"
    if not _files_to_fetch(name, folder):
        log(f"{name}: all files present and verified in {folder}")
        return folder
    reasons = []
    reason = _fetch_torchvision(name, root, log)
    if reason:
        reasons.append(reason)
    todo = _files_to_fetch(name, folder)
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        for fname in todo:
            reasons += _fetch_http(name, fname, folder, log)
    todo = _files_to_fetch(name, folder)
    if todo:
        listing = "\n".join(f"  - {folder / f}  (sha256 {SHA256[name][f]})" for f in todo)
        tried = "\n".join(f"  * {r}" for r in reasons)
        raise DownloadError(
            f"{name}: could not download {len(todo)} file(s) (no internet?):\n{tried}\n"
            f"Put these files, e.g. fetched on a machine with internet by `python datasets.py --root DIR`, "
            f"here:\n{listing}"
        )
    verify_files(name, root)
    return folder
