"""Datasets as NumPy arrays: MNIST-1D (the default), MNIST-format IDX files, TFDS and
modular arithmetic.

Every loader returns a :class:`Dataset` whose validation split is held out of the training
data by a seeded permutation (modular arithmetic: the training split itself, or pairs held out
of the test split; see :mod:`lottojax.data.modular`). Importing this package imports neither ``mnist1d`` nor
``tensorflow_datasets``; the loaders do that when called (MNIST-1D only in a child process).
"""
from __future__ import annotations

from lottojax.data.core import Dataset, hold_out_validation
from lottojax.data.idx import DEBIAN_FASHION_MNIST, load_idx
from lottojax.data.mnist1d import load_mnist1d
from lottojax.data.modular import modular_arithmetic
from lottojax.data.tfds import load_tfds

NAMES = ("mnist1d", "fashion-mnist", "idx", "tfds:<name>", "modular", "modular:<p>[:<op>]")
"""The names :func:`load` accepts; ``<name>`` is a TFDS dataset name such as ``cifar10``."""


def load(name: str, **kwargs) -> Dataset:
    """Loads a dataset by name, passing ``kwargs`` on to its loader.

    Args:
      name: ``'mnist1d'`` (:func:`load_mnist1d`); ``'fashion-mnist'`` (:func:`load_idx` on
        ``directory``, by default Debian's :data:`DEBIAN_FASHION_MNIST`); ``'idx'``
        (:func:`load_idx`, ``directory`` required); or ``'tfds:<name>'``
        (:func:`load_tfds`, e.g. ``'tfds:cifar10'``); ``'modular'``
        (:func:`modular_arithmetic`) or ``'modular:<p>[:<op>]'`` (e.g. ``'modular:97:-'``).
      **kwargs: Keyword arguments of that loader, e.g. ``validation`` and ``split_seed``.

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: If ``name`` is unknown, or ``'idx'`` comes without ``directory``.

    Examples:
      >>> load("mnist1d", validation=1000).x_val.shape
      (1000, 40)
    """
    if name == "mnist1d":
        return load_mnist1d(**kwargs)
    if name == "fashion-mnist":
        return load_idx(kwargs.pop("directory", DEBIAN_FASHION_MNIST), **kwargs)
    if name == "idx":
        if "directory" not in kwargs:
            raise ValueError("load('idx') needs directory=..., the folder holding the four IDX files.")
        return load_idx(**kwargs)
    if name.startswith("tfds:"):
        return load_tfds(name.removeprefix("tfds:"), **kwargs)
    if name == "modular" or name.startswith("modular:"):
        from lottojax.data.modular import parse_name

        return modular_arithmetic(**({} if name == "modular" else parse_name(name)), **kwargs)
    raise ValueError(f"name={name!r} is not a known dataset; valid names: {', '.join(NAMES)}.")


__all__ = [
    "DEBIAN_FASHION_MNIST",
    "NAMES",
    "Dataset",
    "hold_out_validation",
    "load",
    "load_idx",
    "load_mnist1d",
    "load_tfds",
    "modular_arithmetic",
]
