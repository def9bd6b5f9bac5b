"""Image-classification datasets from TensorFlow Datasets, read without TensorFlow.

``tfds.data_source`` reads the ``array_record`` files of a prepared dataset with NumPy only.
Preparing a dataset (downloading and encoding it) is TFDS's job and needs internet access
and TensorFlow; a ``data_dir`` prepared elsewhere can be copied over.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lottojax.data.core import Dataset, hold_out_validation, unit_interval


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets
    except ImportError as err:
        raise ImportError(
            'load_tfds needs TensorFlow Datasets: `pip install "lottojax[tfds]"`.'
        ) from err
    return tensorflow_datasets


def _prepare(builder: Any, name: str) -> None:
    """Downloads and prepares ``builder``'s dataset, explaining how to do it by hand if that fails."""
    try:
        builder.download_and_prepare()
    except Exception as err:
        raise RuntimeError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and preparing it "
            f"failed ({type(err).__name__}: {err}). Preparing needs internet access and "
            "TensorFlow. On a machine with both, run `pip install tensorflow "
            f'"lottojax[tfds]"` and `tfds build {name} --file_format=array_record '
            "--data_dir=DIR`, then copy DIR here and pass data_dir=DIR (or set TFDS_DATA_DIR)."
        ) from err


def _arrays(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Stacks a data source's examples into (images in [0, 1], labels)."""
    examples = [source[i] for i in range(len(source))]
    images = np.stack([example["image"] for example in examples])
    labels = np.array([example["label"] for example in examples])
    return unit_interval(images), labels


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    validation: int = 5000,
    split_seed: int = 0,
) -> Dataset:
    """Loads a TFDS image-classification dataset with ``image`` and ``label`` features.

    Works for any such dataset with ``train`` and ``test`` splits and uint8 images, e.g.
    ``'mnist'``, ``'fashion_mnist'``, ``'kmnist'``, ``'cifar10'`` and ``'cifar100'`` (fine
    labels). The dataset is downloaded and prepared if ``data_dir`` does not hold it yet.

    Args:
      name: The TFDS name, optionally with config and version (``'mnist:3.0.1'``).
      data_dir: TFDS data directory; defaults to ``$TFDS_DATA_DIR``, else
        ``~/tensorflow_datasets``.
      validation: How many training examples to hold out as the validation split.
      split_seed: Seed of the permutation that picks the validation examples.

    Returns:
      A :class:`Dataset` with float32 NHWC images in ``[0, 1]`` and int32 labels.

    Raises:
      ImportError: If tensorflow-datasets is not installed.
      ValueError: If the dataset lacks ``image`` or ``label`` features.
      RuntimeError: If the dataset is not prepared and preparing it fails (e.g. offline).

    Examples:
      Needs the dataset prepared in ``data_dir`` (or internet access and TensorFlow)::

        ds = load_tfds("cifar10")
        ds.x_train.shape, ds.x_val.shape, ds.x_test.shape
        # ((45000, 32, 32, 3), (5000, 32, 32, 3), (10000, 32, 32, 3))
    """
    tfds = _import_tfds()
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    missing = {"image", "label"} - set(builder.info.features.keys())
    if missing:
        raise ValueError(
            f"name={name!r}: load_tfds needs image classification data with 'image' and "
            f"'label' features; this dataset lacks {sorted(missing)}."
        )
    if not builder.is_prepared():
        _prepare(builder, name)
    train, test = builder.as_data_source(split=["train", "test"])
    (x, y), (x_test, y_test) = _arrays(train), _arrays(test)
    return hold_out_validation(x, y, x_test, y_test, validation=validation, seed=split_seed)
