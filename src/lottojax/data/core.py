"""The dataset container every loader returns."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """Train, validation and test splits as arrays (a pytree: pass it into jit whole).

    Inputs are float32 with the sample axis first (``(N, 40)`` for MNIST-1D, ``(N, 28, 28, 1)``
    for MNIST-like images, ``(N, 32, 32, 3)`` for CIFAR); labels are int32 class indices.
    The validation split is held out of the training data (as in Frankle & Carbin, who hold
    5,000 of MNIST's 60,000 training images out for early stopping).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def hold_out_validation(x, y, x_test, y_test, *, validation: int, seed: int) -> Dataset:
    """Splits ``validation`` examples off the training set by a seeded permutation.

    Examples:
      >>> x = np.arange(10, dtype=np.float32)[:, None]; y = np.arange(10) % 2
      >>> ds = hold_out_validation(x, y, x[:2], y[:2], validation=3, seed=0)
      >>> ds.x_train.shape, ds.x_val.shape, ds.y_val.dtype
      ((7, 1), (3, 1), dtype('int32'))
    """
    if not 0 <= validation < len(x):
        raise ValueError(
            f"validation={validation} must be in [0, {len(x)}): the training split has "
            f"{len(x)} examples."
        )
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:validation], order[validation:]
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    return Dataset(
        x[train], y[train], x[val], y[val],
        np.asarray(x_test, np.float32), np.asarray(y_test, np.int32),
    )


def unit_interval(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels ``0..255`` to float32 values in ``[0, 1]``.

    Examples:
      >>> unit_interval(np.array([0, 51, 255], np.uint8))
      array([0. , 0.2, 1. ], dtype=float32)
    """
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (pixels 0..255), got dtype {images.dtype}.")
    return images.astype(np.float32) / np.float32(255)
