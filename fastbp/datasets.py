"""MNIST for the book's code: ``load_mnist`` with the book's signature and return value.

Three sources:

* ``"full"``   -- the 60,000/10,000 MNIST digits, read from the four standard IDX ``.gz`` files or
  from the book's ``mnist.pkl`` in a data directory (``data_dir`` argument, else the ``FASTBP_DATA``
  environment variable, else ``$XDG_CACHE_HOME/fastbp/mnist`` / ``~/.cache/fastbp/mnist``); downloaded
  there from public mirrors (SHA-256 verified) when missing and ``download=True``.
* ``"sample"`` -- 5,000 real MNIST digits shipped inside the package, as a fixed stratified
  4,000/1,000 train/test split (400/100 per class).
* ``"auto"``   -- the full data if it is already on disk (never downloads), else the sample; with
  ``verbose=True`` the fallback is announced on stderr, and ``return_info=True`` always says which.

Output conventions follow the book's ``dataset/mnist.py``: images uint8 (N, 784), or float32 in
[0, 1] with ``normalize``, or (N, 1, 28, 28) without ``flatten``; labels uint8 (N,), or one-hot
float64 (N, 10) with ``one_hot_label`` (the book builds them with ``np.zeros``, i.e. float64).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import http.client
import os
import pickle
import pickletools
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "DatasetInfo",
    "MNISTNotFoundError",
    "MIRRORS",
    "MNIST_FILES",
    "PICKLE_NAME",
    "SAMPLE_SEED",
    "default_data_dir",
    "download_mnist",
    "load_mnist",
    "parse_idx",
    "sample_indices",
]

IMG_ROWS = IMG_COLS = 28
IMG_SIZE = IMG_ROWS * IMG_COLS
NUM_CLASSES = 10

ENV_VAR = "FASTBP_DATA"
PICKLE_NAME = "mnist.pkl"
PICKLE_KEYS = ("train_img", "train_label", "test_img", "test_label")


class _Remote(NamedTuple):
    name: str
    size: int
    sha256: str


# Sizes and SHA-256 of the original files as served by yann.lecun.com and its mirrors.
# (torchvision lists the same files with MD5 f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...)
MNIST_FILES = {
    "train_img": _Remote(
        "train-images-idx3-ubyte.gz", 9_912_422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train_label": _Remote(
        "train-labels-idx1-ubyte.gz", 28_881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "test_img": _Remote(
        "t10k-images-idx3-ubyte.gz", 1_648_877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "test_label": _Remote(
        "t10k-labels-idx1-ubyte.gz", 4_542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
    "http://yann.lecun.com/exdb/mnist/",  # original (often unavailable)
)
DOWNLOAD_TIMEOUT = 30.0  # seconds, per connect/read

SAMPLE_FILE = "mnist-5k.npz"
SAMPLE_SEED = 20261125
SAMPLE_TRAIN_PER_CLASS = 400
SAMPLE_TEST_PER_CLASS = 100

_SOURCES = ("auto", "full", "sample")
_IDX_MAGIC = {"labels": 0x00000801, "images": 0x00000803}
_IDX_UBYTE = 0x08


class MNISTNotFoundError(FileNotFoundError):
    """Full MNIST is neither on disk nor downloadable; the message says where to put which files."""


@dataclass(frozen=True)
class DatasetInfo:
    """Which data ``load_mnist`` returned: source ("full"/"sample"), format, path read, split sizes."""

    source: str
    format: str
    path: str
    n_train: int
    n_test: int

    def __str__(self):
        return f"{self.source} MNIST ({self.format}, {self.n_train} train / {self.n_test} test) from {self.path}"


# ----------------------------------------------------------------------------------------------
# IDX parsing
# ----------------------------------------------------------------------------------------------


def parse_idx(source, kind=None, *, name=None):
    """Parse an unsigned-byte IDX file (gzip'd or raw) -> uint8 array of the header's dimensions.

    ``source`` is a path or the file's bytes; ``kind`` None, "images" (magic 0x00000803) or
    "labels" (magic 0x00000801). Raises ValueError naming the file on bad gzip, wrong magic,
    unsupported data type or a payload whose length differs from the header's dimensions.
    """
    if kind is not None and kind not in _IDX_MAGIC:
        raise ValueError(f"kind must be None, 'images' or 'labels', got {kind!r}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        raw = path.read_bytes()
        gz_name = path.name.endswith(".gz")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        raw = bytes(source)
        gz_name = label.endswith(".gz")
    else:
        raise TypeError(f"parse_idx expects a path or bytes, got {type(source).__name__}")

    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(
                f"{label}: corrupted gzip data ({type(exc).__name__}: {exc}); delete the file and fetch it again"
            ) from None
    elif gz_name:
        raise ValueError(
            f"{label}: expected gzip data (magic 1f 8b) for a .gz file, found {raw[:2].hex(' ') or 'an empty file'}"
        )
    else:
        data = raw

    if len(data) < 4:
        raise ValueError(f"{label}: truncated IDX header: expected at least 4 bytes, found {len(data)}")
    magic = int.from_bytes(data[:4], "big")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if kind is not None and magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{label}: wrong IDX magic for {kind}: expected 0x{_IDX_MAGIC[kind]:08x}, found 0x{magic:08x}")
    if zero != 0 or ndim == 0:
        raise ValueError(
            f"{label}: not an IDX file: expected magic 0x000008NN (NN = number of dimensions >= 1), found 0x{magic:08x}"
        )
    if dtype_code != _IDX_UBYTE:
        raise ValueError(f"{label}: unsupported IDX data type: expected 0x08 (unsigned byte), found 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{label}: truncated IDX header: expected {header} bytes for {ndim} dimensions, found {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes after"
        raise ValueError(
            f"{label}: {what} IDX payload: dimensions {dims} need {expected} bytes in total, found {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


# ----------------------------------------------------------------------------------------------
# Data directory
# ----------------------------------------------------------------------------------------------


def default_data_dir():
    """Directory searched for full MNIST when no data_dir is given: $FASTBP_DATA, else the user cache."""
    return _resolve_data_dir(None)[0]


def _resolve_data_dir(data_dir):
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), f"${ENV_VAR}"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "fastbp" / "mnist", "$XDG_CACHE_HOME/fastbp/mnist (default)"
    return Path.home() / ".cache" / "fastbp" / "mnist", "~/.cache/fastbp/mnist (default)"


def _idx_path(directory, key):
    """Path of the IDX file for key in directory (``name.gz`` or the unpacked ``name``), or None."""
    gz = directory / MNIST_FILES[key].name
    if gz.is_file():
        return gz
    plain = directory / MNIST_FILES[key].name[:-3]
    return plain if plain.is_file() else None


def _scan(directory):
    """-> ("idx", {key: path}) | ("pickle", path) | (None, {key: path of the IDX files present})."""
    found = {key: p for key in MNIST_FILES if (p := _idx_path(directory, key)) is not None}
    if len(found) == len(MNIST_FILES):
        return "idx", found
    pkl = directory / PICKLE_NAME
    if pkl.is_file():
        return "pickle", pkl
    return None, found


def _not_found_message(directory, how, present=(), problem=None):
    names = "\n".join(f"    {r.name}" for r in MNIST_FILES.values())
    lines = [f"Full MNIST not found in {directory} (data directory from {how})."]
    if present:
        missing = [MNIST_FILES[k].name for k in MNIST_FILES if k not in present]
        lines.append(f"The directory is incomplete; missing: {', '.join(missing)}.")
    if problem:
        lines.append(problem)
    lines += [
        f"Put these four files in {directory}:",
        names,
        f"(or the book's {PICKLE_NAME} with keys {', '.join(PICKLE_KEYS)}), point "
        f"data_dir= or ${ENV_VAR} at a directory holding them, or download them with "
        f"load_mnist(source='full', download=True) from a machine with internet access.",
        "For the 5,000 digits bundled with fastbp use load_mnist(source='sample').",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


def _open_url(url, timeout):
    """Open url for reading (the single point where this module touches the network)."""
    request = urllib.request.Request(url, headers={"User-Agent": "fastbp-datasets"})
    return urllib.request.urlopen(request, timeout=timeout)


class _Progress:
    """Download progress on stderr: a \\r-updated bar on a terminal, start/end lines otherwise."""

    def __init__(self, label, total, enabled):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.shown = -1
        if enabled and not self.tty:
            sys.stderr.write(f"fastbp: downloading {label} ({total / 1e6:.1f} MB) ...\n")

    def update(self, done):
        if not self.tty:
            return
        pct = min(100, done * 100 // max(self.total, 1))
        if pct != self.shown:
            self.shown = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\rfastbp: {self.label} [{bar:<25}] {pct:3d}% {done / 1e6:.1f}/{self.total / 1e6:.1f} MB")
            sys.stderr.flush()

    def close(self, ok):
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\n")
        if not ok:
            sys.stderr.write(f"fastbp: download of {self.label} failed\n")
        sys.stderr.flush()


def _fetch(url, dest, remote, timeout, verbose):
    """Stream url into dest, enforcing the expected size; ValueError on size or SHA-256 mismatch."""
    digest = hashlib.sha256()
    done = 0
    progress = _Progress(url, remote.size, verbose)
    ok = False
    try:
        with _open_url(url, timeout) as response, open(dest, "wb") as out:
            while chunk := response.read(1 << 16):
                done += len(chunk)
                if done > remote.size:
                    raise ValueError(f"received more than the expected {remote.size} bytes")
                digest.update(chunk)
                out.write(chunk)
                progress.update(done)
        if done != remote.size:
            raise ValueError(f"size mismatch: expected {remote.size} bytes, received {done}")
        if digest.hexdigest() != remote.sha256:
            raise ValueError(f"SHA-256 mismatch: expected {remote.sha256}, got {digest.hexdigest()}")
        ok = True
    finally:
        progress.close(ok)


def download_mnist(data_dir=None, *, mirrors=MIRRORS, timeout=DOWNLOAD_TIMEOUT, verbose=True):
    """Download the missing MNIST IDX files into the data directory (SHA-256 checked) -> that directory.

    Each file is tried on every mirror in turn and only moved into place once its size and
    SHA-256 match; raises MNISTNotFoundError (a FileNotFoundError) if some file cannot be fetched.
    """
    if isinstance(mirrors, str) or not mirrors:
        raise ValueError(f"mirrors must be a non-empty sequence of base URLs, got {mirrors!r}")
    return _download(*_resolve_data_dir(data_dir), mirrors, timeout, verbose)


def _download(directory, how, mirrors, timeout, verbose):
    present = {key: p for key in MNIST_FILES if (p := _idx_path(directory, key)) is not None}
    missing = [key for key in MNIST_FILES if key not in present]
    if not missing:
        return directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MNISTNotFoundError(
            _not_found_message(directory, how, present, f"Cannot create the directory to download into: {exc}")
        ) from exc
    for key in missing:
        remote = MNIST_FILES[key]
        target = directory / remote.name
        part = directory / (remote.name + ".part")
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + remote.name
            try:
                _fetch(url, part, remote, timeout, verbose)
                os.replace(part, target)
                present[key] = target
                break
            except (OSError, ValueError, http.client.HTTPException) as exc:
                # OSError covers URLError, HTTPError, timeouts and disk errors.
                errors.append(f"    {url}: {_describe(exc)}")
            finally:
                part.unlink(missing_ok=True)
        else:
            problem = f"Downloading {remote.name} failed on every mirror (no internet access?):\n" + "\n".join(errors)
            raise MNISTNotFoundError(_not_found_message(directory, how, present, problem))
    return directory


def _describe(exc):
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------------
# Loading the full data
# ----------------------------------------------------------------------------------------------


def _check_labels(labels, label):
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
        raise ValueError(
            f"{label}: label values must be in 0..{NUM_CLASSES - 1}, found "
            f"{bad.size} outside that range (e.g. {int(bad[0])})"
        )


def _check_pair(images, labels, img_label, lbl_label):
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_label} has {images.shape[0]} images but {lbl_label} has "
            f"{labels.shape[0]} labels; expected the same count"
        )


def _load_idx_dir(files):
    out = {}
    for split in ("train", "test"):
        img_path, lbl_path = files[f"{split}_img"], files[f"{split}_label"]
        images = parse_idx(img_path, "images")
        if images.shape[1:] != (IMG_ROWS, IMG_COLS):
            raise ValueError(
                f"{img_path}: expected {IMG_ROWS}x{IMG_COLS} images, found images of shape {images.shape[1:]}"
            )
        labels = parse_idx(lbl_path, "labels")
        _check_labels(labels, str(lbl_path))
        _check_pair(images, labels, str(img_path), str(lbl_path))
        out[f"{split}_img"] = images.reshape(-1, IMG_SIZE)
        out[f"{split}_label"] = labels
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds NumPy arrays (no arbitrary code from an untrusted mnist.pkl)."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol 2 stores bytes this way
    }

    def find_class(self, module, name):
        if module == "numpy.core" or module.startswith("numpy.core."):  # pickles made with NumPy 1.x
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in {PICKLE_NAME} (only NumPy arrays are)"
            )
        return super().find_class(module, name)


#: Largest mnist.pkl read (the book's is about 55 MB: 70,000 uint8 images of 784 bytes and their labels).
MAX_PICKLE_BYTES = 1 << 30


def _check_pickle_ops(raw):
    """Walk the pickle's opcodes without building anything: every counted string, bytes object and frame must
    fit in the file (a damaged or hostile header claiming 2**40 bytes would otherwise be allocated first)."""
    size = len(raw)
    stream = io.BytesIO(raw)
    for op, arg, pos in pickletools.genops(stream):  # (short counted strings raise ValueError here)
        if op.name == "FRAME" and pos + 9 + arg > size:
            raise ValueError(f"frame at byte {pos} claims {arg} bytes but only {size - pos - 9} remain")
        if op.name == "STOP":
            return


def _load_pickle(path):
    size = os.path.getsize(path)
    if size > MAX_PICKLE_BYTES:
        raise ValueError(
            f"{path}: cannot read the book's {PICKLE_NAME}: the file has {size} bytes, more than "
            f"any MNIST pickle ({MAX_PICKLE_BYTES} bytes at most)"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(size + 1)
        if len(raw) > MAX_PICKLE_BYTES:
            raise ValueError(f"the file grew past {MAX_PICKLE_BYTES} bytes while being read")
        _check_pickle_ops(raw)
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
        RecursionError,
        UnicodeDecodeError,
    ) as exc:
        raise ValueError(f"{path}: cannot read the book's {PICKLE_NAME}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or not all(k in obj for k in PICKLE_KEYS):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with keys {list(PICKLE_KEYS)}, found {found}")
    out = {}
    for split in ("train", "test"):
        img_key, lbl_key = f"{split}_img", f"{split}_label"
        images, labels = obj[img_key], obj[lbl_key]
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(
                f"{path}: {img_key} must be a uint8 array, found {getattr(images, 'dtype', type(images).__name__)}"
            )
        if images.shape[1:] not in ((IMG_SIZE,), (IMG_ROWS, IMG_COLS), (1, IMG_ROWS, IMG_COLS)):
            raise ValueError(
                f"{path}: {img_key} must have shape (N, 784), (N, 28, 28) or (N, 1, 28, 28), found {images.shape}"
            )
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: {lbl_key} must be a 1-D integer array of class labels, found "
                f"{getattr(labels, 'dtype', type(labels).__name__)} "
                f"{getattr(labels, 'shape', '')}"
            )
        _check_labels(labels, f"{path}: {lbl_key}")
        _check_pair(images, labels, f"{path}: {img_key}", f"{lbl_key}")
        out[img_key] = np.array(images.reshape(-1, IMG_SIZE), dtype=np.uint8, copy=True)
        out[lbl_key] = np.array(labels, dtype=np.uint8, copy=True)
    return out


def _load_full(kind, where):
    if kind == "idx":
        data = _load_idx_dir(where)
        path = str(next(iter(where.values())).parent)
    else:
        data = _load_pickle(where)
        path = str(where)
    info = DatasetInfo("full", kind, path, len(data["train_label"]), len(data["test_label"]))
    return data, info


# ----------------------------------------------------------------------------------------------
# Bundled sample
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _sample_arrays():
    """The bundled 5,000 digits as read-only (images (5000, 28, 28), labels (5000,)) uint8 arrays."""
    ref = resources.files(__package__ or "fastbp").joinpath("data").joinpath(SAMPLE_FILE)
    with resources.as_file(ref) as path, np.load(path) as npz:
        images, labels = npz["images"], npz["labels"]
    if (
        images.dtype != np.uint8
        or images.shape[1:] != (IMG_ROWS, IMG_COLS)
        or labels.dtype != np.uint8
        or labels.shape != images.shape[:1]
    ):
        raise ValueError(
            f"bundled {SAMPLE_FILE} is damaged: expected uint8 images (N, 28, 28) and "
            f"uint8 labels (N,), found {images.dtype} {images.shape} and "
            f"{labels.dtype} {labels.shape}"
        )
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@lru_cache(maxsize=1)
def _sample_split():
    _, labels = _sample_arrays()
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    per_class = SAMPLE_TRAIN_PER_CLASS + SAMPLE_TEST_PER_CLASS
    if counts.size != NUM_CLASSES or np.any(counts < per_class):
        raise ValueError(
            f"bundled {SAMPLE_FILE} is damaged: expected at least {per_class} digits "
            f"per class, found counts {counts.tolist()}"
        )
    # Only raw PCG64 doubles and stable sorts: the split is the same on every platform.
    rng = np.random.default_rng(SAMPLE_SEED)
    select_key = rng.random(labels.size)
    order_key = rng.random(labels.size)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(select_key[idx], kind="stable")]
        train.append(idx[:SAMPLE_TRAIN_PER_CLASS])
        test.append(idx[SAMPLE_TRAIN_PER_CLASS:per_class])
    train = np.concatenate(train)
    test = np.concatenate(test)
    train = train[np.argsort(order_key[train], kind="stable")]
    test = test[np.argsort(order_key[test], kind="stable")]
    train.flags.writeable = False
    test.flags.writeable = False
    return train, test


def sample_indices():
    """Row indices of the bundled sample's fixed train and test split -> (train_idx, test_idx) int64."""
    train, test = _sample_split()
    return train.astype(np.int64), test.astype(np.int64)


def _load_sample():
    images, labels = _sample_arrays()
    train, test = _sample_split()
    data = {
        "train_img": images[train].reshape(-1, IMG_SIZE),
        "train_label": labels[train],
        "test_img": images[test].reshape(-1, IMG_SIZE),
        "test_label": labels[test],
    }
    path = str(resources.files(__package__ or "fastbp").joinpath("data").joinpath(SAMPLE_FILE))
    return data, DatasetInfo("sample", "npz", path, train.size, test.size)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _one_hot(labels):
    """Book's one-hot: float64 (N, 10) with T[i, labels[i]] = 1."""
    t = np.zeros((labels.size, NUM_CLASSES))
    t[np.arange(labels.size), labels] = 1.0
    return t


def _finish(data, normalize, flatten, one_hot_label):
    out = []
    for split in ("train", "test"):
        x, t = data[f"{split}_img"], data[f"{split}_label"]
        if normalize:
            x = x.astype(np.float32)
            x /= np.float32(255.0)
        if not flatten:
            x = x.reshape(-1, 1, IMG_ROWS, IMG_COLS)
        if one_hot_label:
            t = _one_hot(t)
        out.append((x, t))
    return tuple(out)


def load_mnist(
    normalize=True,
    flatten=True,
    one_hot_label=False,
    *,
    source="auto",
    data_dir=None,
    download=True,
    verbose=True,
    return_info=False,
):
    """MNIST as the book returns it -> ((x_train, t_train), (x_test, t_test)) [, DatasetInfo].

    normalize: images float32 x / 255 in [0, 1] (else uint8 0..255).
    flatten: images (N, 784) (else (N, 1, 28, 28)).
    one_hot_label: labels float64 one-hot (N, 10) (else uint8 (N,)).
    source: "full" (60,000/10,000 MNIST from the data directory, downloaded if missing and
        ``download``), "sample" (bundled 4,000/1,000 split of 5,000 real digits) or "auto" (full
        if already on disk, else the sample -- never downloads; the fallback is announced on
        stderr when ``verbose``).
    data_dir: directory holding the four IDX .gz files or the book's mnist.pkl; default
        $FASTBP_DATA, else $XDG_CACHE_HOME/fastbp/mnist or ~/.cache/fastbp/mnist. Ignored for
        source="sample".
    return_info: also return a DatasetInfo saying which data was loaded.

    Raises MNISTNotFoundError (a FileNotFoundError) naming the searched directory and the files
    to put there when full MNIST is required but unavailable, and ValueError for damaged files.
    Every call returns freshly allocated arrays.
    """
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path (str or os.PathLike) or None, got {type(data_dir).__name__}")

    if source == "sample":
        data, info = _load_sample()
    else:
        directory, how = _resolve_data_dir(data_dir)
        kind, where = _scan(directory)
        if kind is not None:
            data, info = _load_full(kind, where)
        elif where:  # some IDX files but not all: an inconsistent directory, never skip it silently
            if source == "full" and download:
                _download(directory, how, MIRRORS, DOWNLOAD_TIMEOUT, verbose)
                data, info = _load_full(*_scan(directory))
            else:
                raise MNISTNotFoundError(_not_found_message(directory, how, where))
        elif source == "full":
            if not download:
                raise MNISTNotFoundError(
                    _not_found_message(directory, how, problem="download=False, so nothing was downloaded.")
                )
            _download(directory, how, MIRRORS, DOWNLOAD_TIMEOUT, verbose)
            data, info = _load_full(*_scan(directory))
        else:
            data, info = _load_sample()
            if verbose:
                sys.stderr.write(
                    f"fastbp: full MNIST not found in {directory}; using the bundled sample "
                    f"({info.n_train} train / {info.n_test} test digits). "
                    f"load_mnist(source='full') downloads the full set.\n"
                )

    result = _finish(data, normalize, flatten, one_hot_label)
    return (result, info) if return_info else result
