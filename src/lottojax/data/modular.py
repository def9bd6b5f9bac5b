"""Modular arithmetic ``(a ∘ b) mod p``: the algorithmic task of grokking (Power et al. 2022).

Every pair ``(a, b)`` of residues (or, with ``ordered=False``, every unordered pair
``a <= b``, as the Grokking-Tickets reference code draws them) is one example: the input is
the two tokens, the label is ``(a ∘ b) mod p``. A seeded permutation of the pairs puts the
first ``int(train_fraction * N)`` into the training split (``int`` as the reference code
does) and the rest into the test split; training is full-batch, so the split is the whole
of the randomness.

Inputs are ``int32`` token ids of shape ``(N, 2)`` (the only loader whose inputs are not
float32: they index an embedding, see :class:`lottojax.models.GrokMLP`); labels are
``int32`` residues.

Validation split (the :class:`~lottojax.data.Dataset` type always has one):

- ``validation=None`` (the default): ``x_val, y_val`` are the training pairs themselves,
  so the validation columns of :class:`lottojax.train.History` are the training-set
  metrics (the train curve of a grokking plot) and no pair leaves the test split;
- ``validation=k``: ``k`` pairs are held out of the *test* pairs (the next ``k`` of the
  permutation), so the training split is still exactly ``int(train_fraction * N)`` pairs.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from lottojax.data.core import Dataset

#: The operations, by symbol: ``(a, b, p) -> label`` on integer arrays. ``'/'`` is
#: ``a * b^(p-2) mod p`` (``a / b`` for prime ``p``) and leaves out pairs with ``b = 0``.
OPS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "+": lambda a, b, p: (a + b) % p,
    "-": lambda a, b, p: (a - b) % p,
    "*": lambda a, b, p: (a * b) % p,
    "/": lambda a, b, p: (a * np.array([pow(int(v), p - 2, p) for v in b], np.int64)) % p,
}


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n ** 0.5) + 1))


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return int(value)


def modular_pairs(p: int, op: str = "+", *, ordered: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every pair and its label, in the order ``a`` major, ``b`` minor: ``(x (N, 2), y (N,))``.

    ``N`` is ``p * p`` for ordered pairs and ``p * (p + 1) / 2`` for unordered ones
    (``a <= b``); ``'/'`` leaves out ``b = 0``.

    Examples:
      >>> x, y = modular_pairs(3, '+', ordered=False)
      >>> x.tolist(), y.tolist()
      ([[0, 0], [0, 1], [0, 2], [1, 1], [1, 2], [2, 2]], [0, 1, 2, 2, 0, 1])
      >>> modular_pairs(67, ordered=False)[0].shape, modular_pairs(5, '-')[1][:5].tolist()
      ((2278, 2), [0, 4, 3, 2, 1])
    """
    p = _check_int(p, "p", 2)
    if op not in OPS:
        raise ValueError(f"op={op!r} unknown; choose from {list(OPS)}")
    if op == "/" and not _is_prime(p):
        raise ValueError(f"p={p} must be prime for op='/' (b has an inverse mod p only then)")
    a, b = (v.reshape(-1) for v in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    keep = np.ones(a.shape, bool) if ordered else a <= b
    if op == "/":
        keep &= b != 0
    a, b = a[keep], b[keep]
    return np.stack([a, b], 1).astype(np.int32), OPS[op](a.astype(np.int64), b.astype(np.int64), p).astype(np.int32)


def modular_arithmetic(p: int = 67, op: str = "+", train_fraction: float = 0.4, seed: int = 0,
                       ordered: bool = True, *, validation: Optional[int] = None) -> Dataset:
    """The modular-arithmetic dataset (module docstring).

    Args:
      p: the modulus (and the number of classes).
      op: ``'+'``, ``'-'``, ``'*'`` or ``'/'`` (:data:`OPS`).
      train_fraction: fraction of the pairs in the training split, in ``(0, 1)``.
      seed: the seed of the permutation that splits the pairs.
      ordered: every ``(a, b)`` (``p²`` pairs), or only ``a <= b`` (the reference's 2278 for
        ``p = 67``; for a non-commutative op this is a different, smaller task).
      validation: ``None``: the validation split is the training split; an int ``k >= 1``:
        ``k`` pairs held out of the test pairs.

    Returns:
      A :class:`~lottojax.data.Dataset` with ``int32`` token inputs ``(N, 2)``.

    Raises:
      ValueError: naming the argument: ``p`` < 2 (or not prime for ``'/'``), an unknown
        ``op``, ``train_fraction`` outside ``(0, 1)`` or leaving a split empty, a bad
        ``validation``.

    Examples:
      >>> ds = modular_arithmetic(67, '+', 0.4, seed=0, ordered=False)
      >>> len(ds.x_train), len(ds.x_test), ds.x_train.dtype, ds.num_classes
      (911, 1367, dtype('int32'), 67)
      >>> bool((ds.x_val == ds.x_train).all())
      True
      >>> ds = modular_arithmetic(5, '-', 0.5, validation=3)
      >>> len(ds.x_train), len(ds.x_val), len(ds.x_test)
      (12, 3, 10)
      >>> modular_arithmetic(5, train_fraction=1.0)
      Traceback (most recent call last):
      ...
      ValueError: train_fraction=1.0 must be in (0, 1)
    """
    x, y = modular_pairs(p, op, ordered=ordered)
    if isinstance(train_fraction, (bool, np.bool_)) or not isinstance(train_fraction, (int, float, np.floating)) \
            or not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction={train_fraction!r} must be in (0, 1)")
    seed = _check_int(seed, "seed", 0)
    n = len(x)
    n_train = int(train_fraction * n)
    if not 0 < n_train < n:
        raise ValueError(f"train_fraction={train_fraction} leaves an empty split of the {n} pairs "
                         f"({n_train} for training)")
    if validation is not None:
        validation = _check_int(validation, "validation", 1)
        if validation >= n - n_train:
            raise ValueError(f"validation={validation} must be < the {n - n_train} test pairs it is held out of")
    order = np.random.default_rng(seed).permutation(n)
    train, rest = order[:n_train], order[n_train:]
    if validation is None:
        val, test = train, rest
    else:
        val, test = rest[:validation], rest[validation:]
    return Dataset(x[train], y[train], x[val].copy(), y[val].copy(), x[test], y[test])


def parse_name(name: str) -> dict:
    """The keyword arguments of a ``'modular:<p>[:<op>]'`` dataset name.

    Examples:
      >>> parse_name('modular:97'), parse_name('modular:7:-')
      ({'p': 97}, {'p': 7, 'op': '-'})
    """
    parts = name.split(":")
    if parts[0] != "modular" or not 2 <= len(parts) <= 3 or not parts[1].isdigit():
        raise ValueError(f"name={name!r}: write 'modular', 'modular:<p>' or 'modular:<p>:<op>' (e.g. 'modular:67:+')")
    kwargs: dict = {"p": int(parts[1])}
    if len(parts) == 3:
        kwargs["op"] = parts[2]
    return kwargs
