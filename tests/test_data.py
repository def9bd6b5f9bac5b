"""Data loaders: shapes, dtypes and ranges, split sizes and determinism, MNIST-1D's process
isolation and cache, IDX parsing and its errors, Fashion-MNIST from Debian, TFDS via mocks."""
import gzip
import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lottojax.data import (
    DEBIAN_FASHION_MNIST, Dataset, hold_out_validation, load, load_idx, load_mnist1d, load_tfds,
)
from lottojax.data import mnist1d as mnist1d_module
from lottojax.data.idx import IDX_DTYPES, parse_idx, read_idx

SPLIT_SIZES = {"x_train": 3500, "x_val": 500, "x_test": 1000}


def examples(x, y):
    """The (input, label) pairs as a sorted list of bytes: compares splits as multisets."""
    pairs = np.concatenate([x.reshape(len(x), -1).astype(np.float64), y[:, None]], axis=1)
    return sorted(row.tobytes() for row in pairs)


def assert_datasets_equal(a, b):
    for field, x, y in zip(Dataset._fields, a, b):
        np.testing.assert_array_equal(x, y, err_msg=field)


@pytest.fixture(scope="session")
def mnist1d_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lottojax-cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, mnist1d_cache):
    monkeypatch.setenv("LOTTOJAX_CACHE", str(mnist1d_cache))


@pytest.fixture(scope="session")
def mnist1d_default(mnist1d_cache):
    return load_mnist1d(cache_dir=mnist1d_cache)


# ----------------------------------------------------------------------------- hold-out split


@given(n=st.integers(1, 40), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_hold_out_validation_partitions_training_set(n, data, seed):
    validation = data.draw(st.integers(0, n - 1))
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    ds = hold_out_validation(x, np.arange(n), x[:1], np.zeros(1), validation=validation, seed=seed)
    assert (len(ds.x_train), len(ds.x_val)) == (n - validation, validation)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.sort(np.concatenate([ds.y_train, ds.y_val])), np.arange(n))
    np.testing.assert_array_equal(ds.x_train[:, 0], 2 * ds.y_train)  # rows keep their labels


@pytest.mark.parametrize("validation", [-1, 10])
def test_hold_out_validation_rejects_bad_size(validation):
    x = np.zeros((10, 1))
    with pytest.raises(ValueError, match=f"validation={validation}"):
        hold_out_validation(x, np.zeros(10), x, np.zeros(10), validation=validation, seed=0)


# ----------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_default_shapes_dtypes_and_labels(mnist1d_default):
    ds = mnist1d_default
    for field, n in SPLIT_SIZES.items():
        assert getattr(ds, field).shape == (n, 40)
        assert getattr(ds, field).dtype == np.float32
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert y.dtype == np.int32
        assert set(np.unique(y)) == set(range(10))
    assert all(np.isfinite(x).all() for x in (ds.x_train, ds.x_val, ds.x_test))
    assert ds.input_shape == (40,) and ds.num_classes == 10


def test_mnist1d_is_deterministic(mnist1d_default):
    assert_datasets_equal(load_mnist1d(), mnist1d_default)  # via $LOTTOJAX_CACHE


def test_mnist1d_split_seed_moves_only_the_validation_split(mnist1d_default, mnist1d_cache):
    other = load_mnist1d(split_seed=1)
    assert not np.array_equal(other.x_val, mnist1d_default.x_val)
    np.testing.assert_array_equal(other.x_test, mnist1d_default.x_test)
    path = mnist1d_module.cache_path(mnist1d_cache, num_samples=5000, train_split=0.8, seed=42)
    with np.load(path) as cached:
        original = examples(cached["x"], cached["y"])
    for ds in (other, mnist1d_default):
        union = np.concatenate([ds.x_train, ds.x_val]), np.concatenate([ds.y_train, ds.y_val])
        assert examples(*union) == original


def test_mnist1d_cache_is_reused_not_regenerated(mnist1d_default, mnist1d_cache, monkeypatch):
    path = mnist1d_module.cache_path(mnist1d_cache, num_samples=5000, train_split=0.8, seed=42)
    mtime = path.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated MNIST-1D although it is cached")

    monkeypatch.setattr(mnist1d_module, "_generate", must_not_run)
    load_mnist1d()
    assert path.stat().st_mtime_ns == mtime


def test_mnist1d_generates_once_per_key(tmp_path, monkeypatch):
    calls = []

    def fake_generate(path, **kwargs):
        calls.append((path.name, kwargs))
        arrays = {"x": np.full((20, 40), len(calls), np.float32), "y": np.arange(20) % 10,
                  "x_test": np.zeros((10, 40), np.float32), "y_test": np.arange(10)}
        mnist1d_module.save_atomically(path, arrays)

    monkeypatch.setattr(mnist1d_module, "_generate", fake_generate)
    first = load_mnist1d(num_samples=30, seed=1, validation=5, cache_dir=tmp_path)
    second = load_mnist1d(num_samples=30, seed=1, validation=5, cache_dir=tmp_path)
    load_mnist1d(num_samples=30, seed=2, validation=5, cache_dir=tmp_path)
    assert [kwargs["seed"] for _, kwargs in calls] == [1, 2]
    assert calls[0][0] != calls[1][0]
    assert_datasets_equal(first, second)
    assert (first.x_train == 1).all() and first.x_train.shape == (15, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, _ in calls)


def test_save_atomically_leaves_no_partial_files(tmp_path, monkeypatch):
    path = tmp_path / "a.npz"
    mnist1d_module.save_atomically(path, {"x": np.arange(3)})
    mnist1d_module.save_atomically(path, {"x": np.arange(4)})
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["x"], np.arange(4))

    def broken_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        mnist1d_module.save_atomically(path, {"x": np.arange(5)})
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["x"], np.arange(4))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_samples": 105}, "num_samples=105"), ({"num_samples": 0}, "num_samples=0"),
     ({"train_split": 1.0}, "train_split=1.0"), ({"validation": 4000}, "validation=4000")],
)
def test_mnist1d_rejects_bad_arguments(mnist1d_default, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnist1d(**kwargs)


def test_caller_process_stays_clean(tmp_path):
    """In a fresh interpreter: importing lottojax.data imports neither mnist1d nor tfds, and
    generating MNIST-1D leaves the global RNGs and sys.modules of the caller untouched."""
    script = textwrap.dedent(
        """
        import json, random, sys
        import numpy as np
        import lottojax.data
        report = {"on_import": sorted({"mnist1d", "tensorflow_datasets"} & set(sys.modules))}
        np.random.seed(123); random.seed(456)
        np_state, py_state, modules = np.random.get_state(), random.getstate(), set(sys.modules)
        ds = lottojax.data.load_mnist1d(num_samples=100, train_split=0.5, validation=10, cache_dir=sys.argv[1])
        report["new_modules"] = sorted(
            m for m in set(sys.modules) - modules if m.split(".")[0] in {"mnist1d", "matplotlib", "scipy"})
        report["np_rng_same"] = all(np.array_equal(a, b) for a, b in zip(np_state, np.random.get_state()))
        report["py_rng_same"] = random.getstate() == py_state
        report["shapes"] = [list(x.shape) for x in ds]
        print(json.dumps(report))
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {
        "on_import": [], "new_modules": [], "np_rng_same": True, "py_rng_same": True,
        "shapes": [[40, 40], [40], [10, 40], [10], [50, 40], [50]],
    }
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]


# ----------------------------------------------------------------------------- IDX


def idx_bytes(array, code):
    """An IDX file by hand: zero, zero, dtype code, ndim, big-endian sizes, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(IDX_DTYPES[code]).tobytes()


def write_idx_dir(directory, arrays, gzipped):
    directory.mkdir(exist_ok=True)
    stems = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for key, stem in stems.items():
        raw = idx_bytes(arrays[key], 0x08)
        compress = gzipped if isinstance(gzipped, bool) else key in gzipped
        if compress:
            stem, raw = stem + ".gz", gzip.compress(raw)
        (directory / stem).write_bytes(raw)
    return directory


@pytest.fixture
def tiny_arrays():
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (12, 2, 3), dtype=np.uint8),
        "y_train": np.arange(12, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (4, 2, 3), dtype=np.uint8),
        "y_test": np.array([9, 0, 255, 1], np.uint8),
    }


@pytest.mark.parametrize("gzipped", [False, True, ("x_train", "y_test")], ids=["raw", "gzip", "mixed"])
def test_idx_round_trips_exactly(tmp_path, tiny_arrays, gzipped):
    ds = load_idx(write_idx_dir(tmp_path / "idx", tiny_arrays, gzipped), validation=3, split_seed=1)
    assert ds.x_test.shape == (4, 2, 3, 1) and ds.x_test.dtype == np.float32
    np.testing.assert_array_equal(ds.x_test[..., 0], tiny_arrays["x_test"].astype(np.float32) / 255)
    np.testing.assert_array_equal(np.rint(ds.x_test[..., 0] * 255), tiny_arrays["x_test"])
    np.testing.assert_array_equal(ds.y_test, [9, 0, 255, 1])
    assert ds.y_test.dtype == np.int32
    assert (len(ds.x_train), len(ds.x_val)) == (9, 3)
    union = np.rint(np.concatenate([ds.x_train, ds.x_val]) * 255), np.concatenate([ds.y_train, ds.y_val])
    assert examples(*union) == examples(tiny_arrays["x_train"], tiny_arrays["y_train"])


def test_idx_split_seed(tmp_path, tiny_arrays):
    directory = write_idx_dir(tmp_path / "idx", tiny_arrays, gzipped=True)
    assert_datasets_equal(load_idx(directory, validation=4), load_idx(directory, validation=4))
    moved = load_idx(directory, validation=4, split_seed=1)
    assert not np.array_equal(load_idx(directory, validation=4).y_val, moved.y_val)


@pytest.mark.parametrize("code", sorted(IDX_DTYPES))
def test_parse_idx_every_dtype_big_endian(code):
    native = IDX_DTYPES[code].newbyteorder("=")
    values = np.arange(24).reshape(2, 3, 4) * 5
    array = (values if native.kind == "u" else values / 2 - 30).astype(native)
    parsed = parse_idx(idx_bytes(array, code))
    assert parsed.dtype == native and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, array)


def test_parse_idx_literal_bytes():
    raw = b"\x00\x00\x0b\x01\x00\x00\x00\x02\x01\x02\xff\xfe"  # two big-endian int16
    np.testing.assert_array_equal(parse_idx(raw), [0x0102, -2])


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x00\x00", "not an IDX file"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "two zero bytes"),
        (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x07", "dtype code"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header; 3 dimensions need 16"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x08", r"shape \(3,\) of uint8, i.e. 11 bytes .* has 10"),
        (b"\x00\x00\x0c\x01\x00\x00\x00\x01\x00\x00\x00\x07\x00", r"shape \(1,\) of int32, i.e. 12 bytes"),
        (b"\x1f\x8bgarbage", "corrupt gzip"),
    ],
)
def test_read_idx_header_errors_name_file(tmp_path, raw, match):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_load_idx_checks_what_each_file_holds(tmp_path, tiny_arrays):
    short = {**tiny_arrays, "y_train": tiny_arrays["y_train"][:11]}
    labels_short = write_idx_dir(tmp_path / "a", short, gzipped=False)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: expected 12 uint8 labels"):
        load_idx(labels_short, validation=1)
    flat = {**tiny_arrays, "x_test": tiny_arrays["y_test"]}
    flat_images = write_idx_dir(tmp_path / "b", flat, gzipped=False)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected images, a 3-d uint8"):
        load_idx(flat_images, validation=1)


def test_load_idx_missing_directory_and_file(tmp_path, tiny_arrays):
    with pytest.raises(FileNotFoundError, match=r"directory=.*nope.*apt-get install dataset-fashion-mnist"):
        load_idx(tmp_path / "nope")
    directory = write_idx_dir(tmp_path / "idx", tiny_arrays, gzipped=True)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte\.gz"):
        load_idx(directory)


@pytest.fixture(scope="module")
def fashion_mnist():
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is absent; `apt-get install dataset-fashion-mnist` provides it")
    return load("fashion-mnist")


def test_fashion_mnist_from_debian(fashion_mnist):
    ds = fashion_mnist
    assert [x.shape for x in ds] == [(55000, 28, 28, 1), (55000,), (5000, 28, 28, 1), (5000,),
                                     (10000, 28, 28, 1), (10000,)]
    assert [x.dtype for x in ds] == [np.float32, np.int32] * 3
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert set(np.unique(y)) == set(range(10))
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([ds.y_train, ds.y_val])).tolist() == [6000] * 10
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert ds.y_test[0] == 9  # the test set keeps its order; Fashion-MNIST's first is an ankle boot


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize(
    "name, shape, classes",
    [("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10),
     ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_tfds_mocked(tfds, name, shape, classes):
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = load_tfds(name, validation=5, split_seed=3)
        assert_datasets_equal(ds, load("tfds:" + name, validation=5, split_seed=3))
    assert [x.shape for x in ds] == [(15, *shape), (15,), (5, *shape), (5,), (20, *shape), (20,)]
    assert [x.dtype for x in ds] == [np.float32, np.int32] * 3
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert 0 <= y.min() and y.max() < classes


def test_tfds_not_prepared_offline(tfds, tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    match = r"not prepared in .*ConnectionError: no internet.*tfds build mnist"
    with pytest.raises(RuntimeError, match=match) as info:
        load_tfds("mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_tfds_needs_image_classification(tfds, tmp_path):
    with pytest.raises(ValueError, match=r"name='imdb_reviews'.*lacks \['image'\]"):
        load_tfds("imdb_reviews", data_dir=tmp_path)


def test_tfds_missing_package_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r'pip install "lottojax\[tfds\]"'):
        load_tfds("mnist")


# ----------------------------------------------------------------------------- load()


def test_load_dispatches(mnist1d_default, tmp_path, tiny_arrays):
    assert_datasets_equal(load("mnist1d"), mnist1d_default)
    directory = write_idx_dir(tmp_path / "idx", tiny_arrays, gzipped=False)
    assert_datasets_equal(load("idx", directory=directory, validation=2), load_idx(directory, validation=2))
    fashion = load("fashion-mnist", directory=directory, validation=2)
    assert_datasets_equal(fashion, load_idx(directory, validation=2))


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"name='cifar10' .*mnist1d, fashion-mnist, idx, tfds:<name>"):
        load("cifar10")
    with pytest.raises(ValueError, match=r"load\('idx'\) needs directory="):
        load("idx")
