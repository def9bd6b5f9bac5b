"""MNIST-1D (Greydanus & Kobak, 2020): 40-sample 1-D signals of the ten digits, built in seconds.

The ``mnist1d`` package reseeds NumPy's and Python's global random generators and imports
``matplotlib.pyplot``. To keep both out of the caller, the data are generated in a child
process (``python -m lottojax.data.mnist1d --out PATH ...``) and cached as ``.npz`` under
the cache directory: ``cache_dir``, else ``$LOTTOJAX_CACHE``, else ``~/.cache/lottojax``.
The calling process only ever reads that file.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import operator
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np

from lottojax.data.core import Dataset, hold_out_validation

_ARRAYS = ("x", "y", "x_test", "y_test")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LOTTOJAX_CACHE`` if set, else ``~/.cache/lottojax``.

    Examples:
      >>> resolve_cache_dir("/tmp/lottojax-cache")
      PosixPath('/tmp/lottojax-cache')
    """
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LOTTOJAX_CACHE") or Path.home() / ".cache" / "lottojax")


def cache_path(cache_dir: Path, *, num_samples: int, train_split: float, seed: int) -> Path:
    """The cache file for one set of generation arguments and the installed mnist1d version.

    Examples:
      >>> cache_path(Path("/c"), num_samples=5000, train_split=0.8, seed=42).name
      'mnist1d-...-n5000-split0.8-seed42.npz'
    """
    version = _mnist1d_version()
    return cache_dir / f"mnist1d-{version}-n{num_samples}-split{train_split!r}-seed{seed}.npz"


def _mnist1d_version() -> str:
    try:
        return importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError("load_mnist1d needs the mnist1d package: `pip install mnist1d`.") from err


def _check_args(num_samples: int, train_split: float) -> None:
    if num_samples < 10 or num_samples % 10:
        raise ValueError(
            f"num_samples={num_samples} must be a positive multiple of 10 (MNIST-1D makes "
            "num_samples // 10 examples of each digit)."
        )
    if not 0 < train_split < 1:
        raise ValueError(f"train_split={train_split} must be strictly between 0 and 1.")


def _generate(path: Path, *, num_samples: int, train_split: float, seed: int) -> None:
    """Runs this module as a child process that writes the arrays to ``path``."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "lottojax.data.mnist1d", "--out", str(path),
        "--num-samples", str(num_samples), "--train-split", repr(train_split), "--seed", str(seed),
    ]
    # cwd: `-m` puts the working directory first on sys.path, where a file named mnist1d.py
    # (this one, if run from lottojax/data) would shadow the mnist1d package.
    result = subprocess.run(command, cwd=path.parent, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"Generating MNIST-1D failed (exit status {result.returncode}); the generator's "
            f"stderr:\n{result.stderr}"
        )


def load_mnist1d(
    *,
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
    validation: int = 500,
    split_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Loads MNIST-1D, generating and caching it on first use.

    Args:
      num_samples: Examples in all (train and test), a multiple of 10.
      train_split: Fraction of the examples that form the training set.
      seed: Seed of the generator; with ``num_samples`` and ``train_split`` it fixes the data.
      validation: How many training examples to hold out as the validation split.
      split_seed: Seed of the permutation that picks the validation examples.
      cache_dir: Where to cache the generated arrays; defaults to ``$LOTTOJAX_CACHE``, else
        ``~/.cache/lottojax``.

    Returns:
      A :class:`Dataset` with float32 inputs of shape ``(N, 40)`` and int32 labels 0..9; the
      defaults give 3500 train, 500 validation and 1000 test examples.

    Raises:
      ValueError: If an argument is out of range.
      RuntimeError: If the generator process fails.

    Examples:
      >>> ds = load_mnist1d()
      >>> ds.x_train.shape, ds.x_val.shape, ds.x_test.shape, ds.y_train.dtype
      ((3500, 40), (500, 40), (1000, 40), dtype('int32'))
    """
    num_samples, train_split, seed = operator.index(num_samples), float(train_split), operator.index(seed)
    _check_args(num_samples, train_split)
    directory = resolve_cache_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = cache_path(directory, num_samples=num_samples, train_split=train_split, seed=seed)
    if not path.exists():
        _generate(path, num_samples=num_samples, train_split=train_split, seed=seed)
    with np.load(path) as arrays:
        x, y, x_test, y_test = (arrays[name] for name in _ARRAYS)
    return hold_out_validation(x, y, x_test, y_test, validation=validation, seed=split_seed)


def generate_arrays(*, num_samples: int, train_split: float, seed: int) -> dict[str, np.ndarray]:
    """Builds MNIST-1D with the ``mnist1d`` package. Run only in the child process: it
    imports matplotlib and reseeds the global random generators."""
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    data = mnist1d.data.make_dataset(args)
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int32),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int32),
    }


def save_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` as ``.npz`` to a temporary file beside ``path``, then renames it, so
    that readers never see a partial file and concurrent writers do not interleave."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as file:
            np.savez(file, **arrays)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate MNIST-1D and save it as .npz.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--train-split", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    arrays = generate_arrays(num_samples=args.num_samples, train_split=args.train_split, seed=args.seed)
    save_atomically(args.out, arrays)


if __name__ == "__main__":
    main()
