"""MNIST-format datasets stored as IDX files (MNIST, Fashion-MNIST, KMNIST, ...).

An IDX file is a big-endian header followed by the raw array: two zero bytes, a dtype code,
the number of dimensions ``ndim``, then ``ndim`` unsigned 32-bit sizes. The four files of an
MNIST-format dataset may be gzipped (``.gz``) or not.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from lottojax.data.core import Dataset, hold_out_validation, unit_interval

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs Fashion-MNIST."""

IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX dtype codes (the header's third byte) and the big-endian dtypes they denote."""

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
"""The four files of an MNIST-format dataset, each optionally suffixed ``.gz``."""

_HOW_TO_GET = (
    "Any MNIST-format dataset ships these four files; for Fashion-MNIST on Debian/Ubuntu run "
    f"`sudo apt-get install dataset-fashion-mnist` (installs to {DEBIAN_FASHION_MNIST})."
)
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(raw: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decodes the bytes of an (uncompressed) IDX file into an array in native byte order.

    Args:
      raw: The whole file content.
      name: What to call the data in error messages (the file's path).

    Returns:
      The array, with the header's shape and dtype.

    Raises:
      ValueError: If the header is malformed or the data length disagrees with it.

    Examples:
      >>> raw = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
      >>> parse_idx(raw)
      array([[1, 2, 3],
             [4, 5, 6]], dtype=uint8)
    """
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        codes = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise ValueError(
            f"{name}: not an IDX file; expected a header starting with two zero bytes and a "
            f"dtype code in ({codes}), got {raw[:4]!r}."
        )
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(
            f"{name}: truncated IDX header; {ndim} dimensions need {offset} header bytes, "
            f"the file has {len(raw)}."
        )
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = offset + dtype.itemsize * int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"{name}: the IDX header declares shape {shape} of {dtype.name}, i.e. {expected} "
            f"bytes in all, but the file has {len(raw)} bytes."
        )
    data = np.frombuffer(raw, dtype, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzipped or not (told apart by content, not by name).

    Raises:
      ValueError: If the file is corrupt gzip or not a well-formed IDX file.

    Examples:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = Path(tmp) / "labels-idx1-ubyte.gz"
      ...     _ = path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])))
      ...     read_idx(path)
      array([7, 8, 9], dtype=uint8)
    """
    raw = Path(path).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err}).") from err
    return parse_idx(raw, name=str(path))


def find_idx_file(directory: Path, stem: str) -> Path:
    """Returns ``directory/stem`` or else ``directory/stem.gz``; errors if neither exists."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{directory} has neither {stem} nor {stem}.gz. {_HOW_TO_GET}"
    )


def _images(path: Path) -> np.ndarray:
    array = read_idx(path)
    if array.ndim != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected images, a 3-d uint8 array (N, height, width); got a "
            f"{array.ndim}-d {array.dtype} array of shape {array.shape}."
        )
    return unit_interval(array)[..., None]


def _labels(path: Path, num_images: int) -> np.ndarray:
    array = read_idx(path)
    if array.shape != (num_images,) or array.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected {num_images} uint8 labels, one per image; got a "
            f"{array.dtype} array of shape {array.shape}."
        )
    return array


def load_idx(directory: str | os.PathLike, *, validation: int = 5000, split_seed: int = 0) -> Dataset:
    """Loads an MNIST-format dataset from a directory of four IDX files.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped
    (``.gz``).

    Args:
      directory: The directory holding the four files, e.g. :data:`DEBIAN_FASHION_MNIST`.
      validation: How many training examples to hold out as the validation split.
      split_seed: Seed of the permutation that picks the validation examples.

    Returns:
      A :class:`Dataset` with float32 images of shape ``(N, height, width, 1)`` in ``[0, 1]``
      and int32 labels.

    Raises:
      FileNotFoundError: If the directory or one of the files is missing.
      ValueError: If a file is not a well-formed IDX file of the expected kind.

    Examples:
      Fashion-MNIST as installed by ``apt-get install dataset-fashion-mnist``::

        ds = load_idx("/usr/share/datasets/fashion-mnist")
        ds.x_train.shape, ds.x_val.shape, ds.x_test.shape
        # ((55000, 28, 28, 1), (5000, 28, 28, 1), (10000, 28, 28, 1))
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"directory={str(directory)!r} is not a directory; it should hold "
            f"{', '.join(IDX_FILES.values())} (each optionally .gz). {_HOW_TO_GET}"
        )
    paths = {key: find_idx_file(directory, stem) for key, stem in IDX_FILES.items()}
    x_train, x_test = _images(paths["x_train"]), _images(paths["x_test"])
    y_train = _labels(paths["y_train"], len(x_train))
    y_test = _labels(paths["y_test"], len(x_test))
    return hold_out_validation(x_train, y_train, x_test, y_test, validation=validation, seed=split_seed)
