"""Tests for fastbp.datasets: IDX parsing, data-directory resolution, download handling, the sample."""

import gzip
import hashlib
import io
import itertools
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from fastbp import datasets as ds
from fastbp.datasets import MNISTNotFoundError, default_data_dir, download_mnist, load_mnist, parse_idx, sample_indices

NAMES = {key: r.name for key, r in ds.MNIST_FILES.items()}
FLAGS = list(itertools.product([True, False], repeat=3))  # normalize, flatten, one_hot_label


# ------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------


def idx_bytes(arr, magic=None, dtype_code=0x08):
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = (dtype_code << 8) | arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def fake_mnist(n_train=30, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train_img": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_label": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_img": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_label": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx_dir(directory, data, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    for key, arr in data.items():
        raw = idx_bytes(arr)
        if compress:
            (directory / NAMES[key]).write_bytes(gzip.compress(raw))
        else:
            (directory / NAMES[key][:-3]).write_bytes(raw)
    return directory


def write_pickle(path, data, protocol=pickle.HIGHEST_PROTOCOL, flat=True):
    obj = {k: (v.reshape(len(v), -1) if flat and k.endswith("img") else v) for k, v in data.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No network, no real user cache, no FASTBP_DATA from the environment."""

    def no_network(url, timeout):
        raise AssertionError(f"test tried to open {url}")

    monkeypatch.setattr(ds, "_open_url", no_network)
    monkeypatch.delenv("FASTBP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def offline(monkeypatch):
    calls = []

    def raise_urlerror(url, timeout):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(ds, "_open_url", raise_urlerror)
    return calls


# ------------------------------------------------------------------------------------------
# parse_idx
# ------------------------------------------------------------------------------------------


def test_parse_idx_images_and_labels_from_bytes_and_paths(tmp_path):
    data = fake_mnist()
    imgs, lbls = data["train_img"], data["train_label"]
    (tmp_path / "i.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    (tmp_path / "l").write_bytes(idx_bytes(lbls))
    for got, want in [
        (parse_idx(idx_bytes(imgs), "images"), imgs),
        (parse_idx(gzip.compress(idx_bytes(lbls)), "labels"), lbls),
        (parse_idx(tmp_path / "i.gz", "images"), imgs),
        (parse_idx(str(tmp_path / "l")), lbls),
    ]:
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable


def test_parse_idx_generic_dimensions():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr[0])), arr[0])


@pytest.mark.parametrize("cut", [1, 500, None])
def test_parse_idx_truncated_payload(tmp_path, cut):
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    raw = raw[:16] if cut is None else raw[:-cut]
    path = tmp_path / NAMES["train_img"]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError) as err:
        parse_idx(path, "images")
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg
    assert f"need {16 + 3 * 784} bytes" in msg and f"found {len(raw)}" in msg


def test_parse_idx_trailing_bytes():
    with pytest.raises(ValueError, match=r"trailing bytes.*need 13 bytes.*found 14"):
        parse_idx(idx_bytes(np.arange(5, dtype=np.uint8)) + b"\x00", "labels")


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x00\x00\x08\x03\x00\x00\x00\x02\x00"])
def test_parse_idx_truncated_header(raw):
    with pytest.raises(ValueError, match="truncated IDX header"):
        parse_idx(raw, name="x-idx")


def test_parse_idx_wrong_magic_names_expected_and_found():
    labels = idx_bytes(np.arange(5, dtype=np.uint8))
    with pytest.raises(
        ValueError,
        match=r"lbl\.idx: wrong IDX magic for images: expected "
        r"0x00000803, found 0x00000801",
    ):
        parse_idx(labels, "images", name="lbl.idx")
    images = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="expected 0x00000801, found 0x00000803"):
        parse_idx(images, "labels")
    with pytest.raises(ValueError, match="not an IDX file.*found 0x504b0304"):
        parse_idx(b"PK\x03\x04" + bytes(20))  # a zip file


def test_parse_idx_rejects_non_ubyte_dtype():
    raw = idx_bytes(np.arange(4, dtype=np.uint8), dtype_code=0x0D)  # IDX float
    with pytest.raises(ValueError, match=r"expected 0x08 \(unsigned byte\), found 0x0d"):
        parse_idx(raw)
    with pytest.raises(ValueError, match="expected 0x00000801, found 0x00000d01"):
        parse_idx(raw, "labels")


def test_parse_idx_bad_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    corrupted = bytearray(good)
    corrupted[-6] ^= 0xFF  # flips a CRC byte
    for name, raw in [
        ("crc.gz", bytes(corrupted)),
        ("cut.gz", good[: len(good) // 2]),
        ("junk.gz", good[:10] + b"\xff" * 40),
    ]:
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=rf"{name}: corrupted gzip data"):
            parse_idx(path, "labels")


def test_parse_idx_gz_name_without_gzip_data(tmp_path):
    path = tmp_path / NAMES["test_label"]
    path.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"expected gzip data \(magic 1f 8b\).*found 00 00"):
        parse_idx(path, "labels")


def test_parse_idx_argument_errors():
    with pytest.raises(TypeError, match="path or bytes, got int"):
        parse_idx(3)
    with pytest.raises(ValueError, match="kind must be"):
        parse_idx(b"", "pixels")


# ------------------------------------------------------------------------------------------
# full MNIST from a directory
# ------------------------------------------------------------------------------------------


def expected_output(data, normalize, flatten, one_hot_label):
    out = []
    for split in ("train", "test"):
        x = data[f"{split}_img"].reshape(-1, 784)
        t = data[f"{split}_label"]
        if normalize:
            x = x.astype(np.float32) / np.float32(255)
        if not flatten:
            x = x.reshape(-1, 1, 28, 28)
        if one_hot_label:
            t = np.eye(10)[t]
        out.append((x, t))
    return out


def check_flags(result, normalize, flatten, one_hot_label, n_train, n_test):
    for (x, t), n in zip(result, (n_train, n_test)):
        assert x.shape == ((n, 784) if flatten else (n, 1, 28, 28))
        if normalize:
            assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        else:
            assert x.dtype == np.uint8
        if one_hot_label:
            assert t.dtype == np.float64 and t.shape == (n, 10)
            assert set(np.unique(t)) <= {0.0, 1.0}
            np.testing.assert_array_equal(t.sum(axis=1), np.ones(n))
        else:
            assert t.dtype == np.uint8 and t.shape == (n,) and t.max() <= 9


@pytest.mark.parametrize("normalize,flatten,one_hot_label", FLAGS)
def test_full_idx_all_flags(tmp_path, normalize, flatten, one_hot_label):
    data = fake_mnist()
    write_idx_dir(tmp_path / "mnist", data)
    result, info = load_mnist(
        normalize, flatten, one_hot_label, source="full", data_dir=tmp_path / "mnist", return_info=True
    )
    check_flags(result, normalize, flatten, one_hot_label, 30, 20)
    for (x, t), (xe, te) in zip(result, expected_output(data, normalize, flatten, one_hot_label)):
        np.testing.assert_array_equal(x, xe)
        np.testing.assert_array_equal(t, te)
    assert (info.source, info.format, info.n_train, info.n_test) == ("full", "idx", 30, 20)
    assert info.path == str(tmp_path / "mnist")


def test_normalization_matches_book_formula(tmp_path):
    data = fake_mnist()
    data["train_img"][0].flat[:256] = np.arange(256)
    write_idx_dir(tmp_path, data)
    (x, _), _ = load_mnist(source="full", data_dir=tmp_path)
    book = data["train_img"].reshape(-1, 784).astype(np.float32)
    book /= 255.0
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, book)
    assert x[0, 0] == 0.0 and x[0, 255] == 1.0


def test_full_idx_uncompressed_files(tmp_path):
    data = fake_mnist()
    write_idx_dir(tmp_path, data, compress=False)
    (_, t_train), (x_test, _) = load_mnist(normalize=False, source="full", data_dir=tmp_path)
    np.testing.assert_array_equal(t_train, data["train_label"])
    np.testing.assert_array_equal(x_test, data["test_img"].reshape(-1, 784))


def test_full_idx_count_mismatch(tmp_path):
    data = fake_mnist()
    data["test_label"] = data["test_label"][:-1]
    write_idx_dir(tmp_path, data)
    with pytest.raises(ValueError) as err:
        load_mnist(source="full", data_dir=tmp_path)
    msg = str(err.value)
    assert NAMES["test_img"] in msg and NAMES["test_label"] in msg
    assert "20 images" in msg and "19 labels" in msg


def test_full_idx_label_out_of_range(tmp_path):
    data = fake_mnist()
    data["train_label"][7] = 10
    write_idx_dir(tmp_path, data)
    with pytest.raises(
        ValueError,
        match=rf"{NAMES['train_label']}: label values must be in "
        r"0\.\.9, found 1 outside .*e\.g\. 10",
    ):
        load_mnist(source="full", data_dir=tmp_path)


def test_full_idx_wrong_image_size(tmp_path):
    data = fake_mnist()
    data["test_img"] = np.zeros((20, 32, 32), np.uint8)
    write_idx_dir(tmp_path, data)
    with pytest.raises(ValueError, match=r"expected 28x28 images, found images of shape \(32, 32\)"):
        load_mnist(source="full", data_dir=tmp_path)


def test_full_idx_files_swapped(tmp_path):
    data = fake_mnist()
    write_idx_dir(tmp_path, data)
    (tmp_path / NAMES["train_label"]).write_bytes(gzip.compress(idx_bytes(data["train_img"])))
    with pytest.raises(ValueError, match="wrong IDX magic for labels"):
        load_mnist(source="full", data_dir=tmp_path)


def test_damaged_local_file_is_an_error_in_auto_mode_too(tmp_path, capsys):
    write_idx_dir(tmp_path, fake_mnist())
    path = tmp_path / NAMES["test_img"]
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="corrupted gzip data"):
        load_mnist(source="auto", data_dir=tmp_path)
    assert "sample" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# the book's mnist.pkl
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("flat", [True, False])
def test_book_pickle(tmp_path, protocol, flat):
    data = fake_mnist(12, 8)
    write_pickle(tmp_path / "mnist.pkl", data, protocol, flat)
    ((x, t), (xt, tt)), info = load_mnist(
        normalize=False, one_hot_label=True, source="full", data_dir=tmp_path, return_info=True
    )
    np.testing.assert_array_equal(x, data["train_img"].reshape(12, 784))
    np.testing.assert_array_equal(xt, data["test_img"].reshape(8, 784))
    np.testing.assert_array_equal(t.argmax(axis=1), data["train_label"])
    np.testing.assert_array_equal(tt.argmax(axis=1), data["test_label"])
    assert x.flags.writeable and xt.flags.writeable
    assert (info.source, info.format, info.path) == ("full", "pickle", str(tmp_path / "mnist.pkl"))


def test_book_pickle_made_with_numpy1_module_names(tmp_path):
    data = fake_mnist(4, 3)
    raw = pickle.dumps(data, protocol=2)  # protocol 2: GLOBAL opcodes with text names, no framing
    assert b"numpy._core.multiarray\n_reconstruct" in raw
    raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    (tmp_path / "mnist.pkl").write_bytes(raw)
    (_, (xt, _)) = load_mnist(normalize=False, source="full", data_dir=tmp_path)
    np.testing.assert_array_equal(xt, data["test_img"].reshape(3, 784))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_book_pickle_refuses_arbitrary_code(tmp_path):
    data = dict(fake_mnist(4, 3), extra=_Evil())
    write_pickle(tmp_path / "mnist.pkl", data)
    with pytest.raises(
        ValueError,
        match=r"mnist\.pkl.*global posix\.getcwd is not allowed"
        if os.name == "posix"
        else r"mnist\.pkl.*is not allowed",
    ):
        load_mnist(source="full", data_dir=tmp_path)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.pop("test_label"), r"expected a dict with keys .*found \['test_img', 'train_img'"),
        (lambda d: d.update(train_img=d["train_img"].astype(np.float32)), "train_img must be a uint8 array"),
        (lambda d: d.update(test_img=np.zeros((3, 100), np.uint8)), r"test_img must have shape .*\(3, 100\)"),
        (lambda d: d.update(train_label=np.eye(10)[d["train_label"]]), "train_label must be a 1-D integer"),
        (lambda d: d.update(test_label=d["test_label"][:2]), "3 images but test_label has 2 labels"),
        (lambda d: d.update(train_label=np.full(4, -1, np.int64)), "label values must be in 0..9"),
    ],
)
def test_book_pickle_validation(tmp_path, mutate, match):
    data = fake_mnist(4, 3)
    mutate(data)
    write_pickle(tmp_path / "mnist.pkl", data)
    with pytest.raises(ValueError, match=match):
        load_mnist(source="full", data_dir=tmp_path)


def test_truncated_pickle(tmp_path):
    path = write_pickle(tmp_path / "mnist.pkl", fake_mnist(4, 3))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the book's mnist.pkl"):
        load_mnist(source="full", data_dir=tmp_path)


def test_idx_files_take_precedence_over_pickle(tmp_path):
    write_idx_dir(tmp_path, fake_mnist(5, 4, seed=1))
    write_pickle(tmp_path / "mnist.pkl", fake_mnist(7, 6, seed=2))
    _, info = load_mnist(source="full", data_dir=tmp_path, return_info=True)
    assert (info.format, info.n_train, info.n_test) == ("idx", 5, 4)


# ------------------------------------------------------------------------------------------
# data directory resolution
# ------------------------------------------------------------------------------------------


def test_default_dir_honours_xdg_and_home(monkeypatch, tmp_path):
    assert default_data_dir() == tmp_path / "xdg-cache" / "fastbp" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored per the XDG spec
    assert default_data_dir() == tmp_path / "home" / ".cache" / "fastbp" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "fastbp" / "mnist"


def test_fastbp_data_env_var(monkeypatch, tmp_path):
    env_dir = write_idx_dir(tmp_path / "from-env", fake_mnist(6, 5))
    monkeypatch.setenv("FASTBP_DATA", str(env_dir))
    assert default_data_dir() == env_dir
    _, info = load_mnist(source="full", return_info=True)
    assert (info.path, info.n_train) == (str(env_dir), 6)
    _, info = load_mnist(source="auto", return_info=True)
    assert info.source == "full" and info.path == str(env_dir)
    # an explicit data_dir wins over the environment
    arg_dir = write_idx_dir(tmp_path / "from-arg", fake_mnist(3, 2))
    _, info = load_mnist(source="full", data_dir=str(arg_dir), return_info=True)
    assert (info.path, info.n_train) == (str(arg_dir), 3)


def test_cache_dir_is_used_by_default(tmp_path):
    write_idx_dir(tmp_path / "xdg-cache" / "fastbp" / "mnist", fake_mnist(9, 4))
    _, info = load_mnist(return_info=True)
    assert (info.source, info.n_train, info.n_test) == ("full", 9, 4)


# ------------------------------------------------------------------------------------------
# missing data, offline download, checksums
# ------------------------------------------------------------------------------------------


def assert_helpful(msg, directory):
    assert str(directory) in msg
    for name in NAMES.values():
        assert name in msg
    assert "source='sample'" in msg


def test_offline_full_raises_helpful_error(monkeypatch, tmp_path):
    calls = offline(monkeypatch)
    target = tmp_path / "nowhere" / "mnist"
    with pytest.raises(MNISTNotFoundError) as err:
        load_mnist(source="full", data_dir=target, verbose=False)
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert_helpful(msg, target)
    assert "Temporary failure in name resolution" in msg
    assert calls == [m + NAMES["train_img"] for m in ds.MIRRORS]  # every mirror, then stop
    assert list(target.iterdir()) == []  # no partial downloads left behind


def test_offline_error_names_env_dir(monkeypatch, tmp_path):
    offline(monkeypatch)
    monkeypatch.setenv("FASTBP_DATA", str(tmp_path / "envdir"))
    with pytest.raises(FileNotFoundError, match=r"envdir \(data directory from \$FASTBP_DATA\)"):
        load_mnist(source="full", verbose=False)


def test_download_false_does_not_touch_network(tmp_path):
    with pytest.raises(MNISTNotFoundError) as err:
        load_mnist(source="full", data_dir=tmp_path / "d", download=False)
    assert_helpful(str(err.value), tmp_path / "d")
    assert "download=False" in str(err.value)
    assert not (tmp_path / "d").exists()


def fake_remotes(monkeypatch, data):
    """Serve fake MNIST files: replaces the table of sizes/hashes and returns {name: bytes}."""
    blobs, table = {}, {}
    for key, arr in data.items():
        blob = gzip.compress(idx_bytes(arr))
        blobs[NAMES[key]] = blob
        table[key] = ds._Remote(NAMES[key], len(blob), hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(ds, "MNIST_FILES", table)
    return blobs


def test_download_success_and_checksum_fallback(monkeypatch, tmp_path, capsys):
    data = fake_mnist(8, 6)
    blobs = fake_remotes(monkeypatch, data)
    requested = []

    def serve(url, timeout):
        requested.append(url)
        assert timeout == ds.DOWNLOAD_TIMEOUT
        name = url.rsplit("/", 1)[1]
        if url.startswith(ds.MIRRORS[0]):  # first mirror serves a corrupted copy
            return io.BytesIO(blobs[name][:-1] + bytes([blobs[name][-1] ^ 1]))
        return io.BytesIO(blobs[name])

    monkeypatch.setattr(ds, "_open_url", serve)

    target = tmp_path / "dl"
    (x, t), _ = load_mnist(normalize=False, source="full", data_dir=target)
    np.testing.assert_array_equal(x, data["train_img"].reshape(8, 784))
    np.testing.assert_array_equal(t, data["train_label"])
    assert sorted(p.name for p in target.iterdir()) == sorted(blobs)
    for name, blob in blobs.items():
        assert (target / name).read_bytes() == blob
    assert len(requested) == 8  # each file: bad first mirror, good second mirror
    assert "downloading" in capsys.readouterr().err
    # everything present now: no further requests
    load_mnist(source="full", data_dir=target)
    assert len(requested) == 8


def test_download_all_mirrors_bad_checksum(monkeypatch, tmp_path):
    blobs = fake_remotes(monkeypatch, fake_mnist(2, 2))
    monkeypatch.setattr(ds, "_open_url", lambda url, timeout: io.BytesIO(b"\x00" * len(blobs[url.rsplit("/", 1)[1]])))
    with pytest.raises(MNISTNotFoundError, match="SHA-256 mismatch: expected") as err:
        download_mnist(tmp_path, verbose=False)
    assert_helpful(str(err.value), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_rejects_oversized_response(monkeypatch, tmp_path):
    blobs = fake_remotes(monkeypatch, fake_mnist(2, 2))
    monkeypatch.setattr(ds, "_open_url", lambda url, timeout: io.BytesIO(blobs[url.rsplit("/", 1)[1]] + b"more"))
    with pytest.raises(MNISTNotFoundError, match="received more than the expected"):
        download_mnist(tmp_path, mirrors=["http://example.invalid/"], verbose=False)


def test_download_fetches_only_missing_files(monkeypatch, tmp_path):
    data = fake_mnist(5, 3)
    blobs = fake_remotes(monkeypatch, data)
    write_idx_dir(tmp_path, {k: data[k] for k in ("train_img", "train_label", "test_img")})
    requested = []
    monkeypatch.setattr(
        ds, "_open_url", lambda url, timeout: (requested.append(url), io.BytesIO(blobs[url.rsplit("/", 1)[1]]))[1]
    )
    _, info = load_mnist(source="full", data_dir=tmp_path, verbose=False, return_info=True)
    assert requested == [ds.MIRRORS[0] + NAMES["test_label"]]
    assert info.n_test == 3


def test_incomplete_directory_is_reported(monkeypatch, tmp_path, capsys):
    write_idx_dir(tmp_path, {k: v for k, v in fake_mnist().items() if k != "test_img"})
    for source in ("auto", "full"):
        with pytest.raises(MNISTNotFoundError, match=rf"incomplete; missing: {NAMES['test_img']}"):
            load_mnist(source=source, data_dir=tmp_path, download=False)
    offline(monkeypatch)
    with pytest.raises(MNISTNotFoundError, match=rf"Downloading {NAMES['test_img']} failed"):
        load_mnist(source="full", data_dir=tmp_path, verbose=False)
    assert "sample (" not in capsys.readouterr().err


def test_download_mirrors_argument_validated(tmp_path):
    with pytest.raises(ValueError, match="mirrors must be a non-empty sequence"):
        download_mnist(tmp_path, mirrors="http://one-string/")
    with pytest.raises(ValueError, match="mirrors must be a non-empty sequence"):
        download_mnist(tmp_path, mirrors=[])


# ------------------------------------------------------------------------------------------
# auto mode
# ------------------------------------------------------------------------------------------


def test_auto_falls_back_to_sample_loudly(tmp_path, capsys):
    ((x, _), _), info = load_mnist(source="auto", data_dir=tmp_path / "empty", return_info=True)
    err = capsys.readouterr().err
    assert info.source == "sample" and x.shape == (4000, 784)
    assert err.count("\n") == 1 and str(tmp_path / "empty") in err and "sample" in err
    assert not (tmp_path / "empty").exists()  # auto never downloads


def test_auto_quiet_when_not_verbose(tmp_path, capsys):
    _, info = load_mnist(data_dir=tmp_path, verbose=False, return_info=True)
    assert info.source == "sample"
    assert capsys.readouterr().err == ""


def test_auto_prefers_local_full_data(tmp_path, capsys):
    write_idx_dir(tmp_path, fake_mnist(11, 7))
    ((x, t), _), info = load_mnist(data_dir=tmp_path, return_info=True)
    assert (info.source, x.shape, t.shape) == ("full", (11, 784), (11,))
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------
# bundled sample
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize,flatten,one_hot_label", FLAGS)
def test_sample_all_flags(normalize, flatten, one_hot_label):
    result, info = load_mnist(normalize, flatten, one_hot_label, source="sample", return_info=True)
    check_flags(result, normalize, flatten, one_hot_label, 4000, 1000)
    assert (info.source, info.format, info.n_train, info.n_test) == ("sample", "npz", 4000, 1000)
    assert Path(info.path).name == "mnist-5k.npz"
    (x, _), _ = result
    if normalize:
        assert x.max() == 1.0 and x.min() == 0.0  # real digits use the full range


def test_sample_split_is_stratified_disjoint_and_shuffled():
    train_idx, test_idx = sample_indices()
    assert train_idx.shape == (4000,) and test_idx.shape == (1000,)
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.unique(np.concatenate([train_idx, test_idx])).size == 5000
    (_, t_train), (_, t_test) = load_mnist(source="sample")
    np.testing.assert_array_equal(np.bincount(t_train, minlength=10), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(t_test, minlength=10), np.full(10, 100))
    for t in (t_train, t_test):  # not sorted by label: many label changes between neighbours
        assert np.count_nonzero(np.diff(t.astype(int))) > 0.8 * t.size


def test_sample_matches_bundled_file_rows():
    with np.load(Path(ds.__file__).parent / "data" / "mnist-5k.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    train_idx, test_idx = sample_indices()
    (x, t), (xt, tt) = load_mnist(normalize=False, flatten=False, source="sample")
    np.testing.assert_array_equal(x[:, 0], images[train_idx])
    np.testing.assert_array_equal(t, labels[train_idx])
    np.testing.assert_array_equal(xt[:, 0], images[test_idx])
    np.testing.assert_array_equal(tt, labels[test_idx])


def test_sample_is_deterministic_and_calls_are_independent():
    (x1, t1), (xt1, tt1) = load_mnist(normalize=False, source="sample")
    x1_copy, t1_copy = x1.copy(), t1.copy()
    x1[:] = 0  # callers own their arrays: scribbling on them must not affect later calls
    t1[:] = 0
    (x2, t2), (xt2, tt2) = load_mnist(normalize=False, source="sample")
    np.testing.assert_array_equal(x2, x1_copy)
    np.testing.assert_array_equal(t2, t1_copy)
    np.testing.assert_array_equal(xt2, xt1)
    np.testing.assert_array_equal(tt2, tt1)


def test_sample_split_is_pinned():
    # Golden digest of the published split: it must not change across platforms or NumPy
    # versions, since results computed on the sample would silently change with it.
    train_idx, test_idx = sample_indices()
    digest = hashlib.sha256(train_idx.astype("<i8").tobytes() + test_idx.astype("<i8").tobytes())
    assert digest.hexdigest() == "6d20531ab2770dd7c8a9e26124a9340d8e242ee0511087575acd5487049dfee9"


def test_sample_ignores_data_dir_and_network(tmp_path):
    write_idx_dir(tmp_path, fake_mnist())
    _, info = load_mnist(source="sample", data_dir=tmp_path, return_info=True)
    assert info.source == "sample"


# ------------------------------------------------------------------------------------------
# argument validation
# ------------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(
        ValueError,
        match=r"source must be one of \('auto', 'full', 'sample'\), "
        r"got 'mnist'",
    ):
        load_mnist(source="mnist")
    with pytest.raises(TypeError, match="data_dir must be a path .* got int"):
        load_mnist(data_dir=5)


def test_book_positional_call_and_return_structure():
    result = load_mnist(True, True, False, source="sample")
    assert isinstance(result, tuple) and len(result) == 2
    assert all(isinstance(pair, tuple) and len(pair) == 2 for pair in result)


def _hostile_pickles():
    """Small damaged mnist.pkl files whose headers claim huge strings or frames (issue 7 item 10)."""
    big = (2**40).to_bytes(8, "little")
    yield "bytes8", b"\x80\x04\x8e" + big + b"abcdefghi"  # 20 bytes claiming 2**40 bytes
    yield "unicode8", b"\x80\x04\x8d" + big + b"abcdefghi"
    yield "bytearray8", b"\x80\x05\x96" + big + b"abcdefghi"
    yield "frame", b"\x80\x04\x95" + big + b"N."
    yield "binstring", b"\x80\x02T" + (2**31 - 1).to_bytes(4, "little") + b"abcdefghi"
    yield "binunicode", b"\x80\x02X" + (2**32 - 1).to_bytes(4, "little") + b"abcdefghi"
    yield "long4", b"\x80\x02\x8b" + (2**31 - 1).to_bytes(4, "little") + b"abcdefghi"
    yield "empty", b""
    yield "not a pickle", b"PK\x03\x04 this is a zip file"


@pytest.mark.parametrize("what,raw", list(_hostile_pickles()), ids=[w for w, _ in _hostile_pickles()])
def test_hostile_or_damaged_pickle_is_a_value_error_naming_the_file(tmp_path, what, raw):
    path = tmp_path / "mnist.pkl"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"mnist\.pkl: cannot read the book's mnist\.pkl") as e:
        load_mnist(source="full", data_dir=tmp_path)
    assert str(path) in str(e.value)


def test_pickle_larger_than_any_mnist_is_refused_before_reading(tmp_path, monkeypatch):
    import fastbp.datasets as D

    path = write_pickle(tmp_path / "mnist.pkl", fake_mnist(4, 3))
    monkeypatch.setattr(D, "MAX_PICKLE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ValueError, match=r"mnist\.pkl: .* bytes, more than any"):
        load_mnist(source="full", data_dir=tmp_path)
    monkeypatch.setattr(D, "MAX_PICKLE_BYTES", path.stat().st_size)
    load_mnist(source="full", data_dir=tmp_path)
