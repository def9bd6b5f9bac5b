"""Run directories, the one results writer, and statistics over seeds.

A run directory is ``<root>/<experiment>-<hash of the config>``: the same config always
lands in the same directory (so a killed run resumes there), a changed one never does.
Fields marked ``extends`` (e.g. ``rounds``) are left out of the hash, so asking a
finished run for more rounds continues it. The directory holds ``config.json``,
``results.json`` (summary: mean, std, n and per-seed values), ``results.npz`` (every
array) and the experiment's checkpoints and plots; all writes are atomic.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from typing import Iterator

import numpy as np

from lottojax.checkpoint import write_json


def config_hash(config) -> str:
    """A short stable hash of a dataclass config (its JSON with sorted keys), leaving out
    fields that only lengthen a run.

    Examples:
      >>> from lottojax.experiments.lottery import LotteryConfig
      >>> config_hash(LotteryConfig()) == config_hash(LotteryConfig(rounds=20))
      True
      >>> config_hash(LotteryConfig()) == config_hash(LotteryConfig(learning_rate=0.1))
      False
    """
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if not f.metadata.get("extends")}
    text = json.dumps(fields, sort_keys=True, default=list)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_directory(root: str, experiment: str, config) -> str:
    """``root/experiment-<hash>`` (not created).

    Examples:
      >>> from lottojax.experiments.lottery import LotteryConfig
      >>> run_directory('runs', 'lottery', LotteryConfig()) == run_directory('runs', 'lottery', LotteryConfig(seeds=(1,)))
      False
    """
    return os.path.join(root, f"{experiment}-{config_hash(config)}")


@contextlib.contextmanager
def open_run(root: str, experiment: str, config) -> Iterator[str]:
    """Creates (or reopens) the run directory and writes ``config.json`` into it. If the
    body fails before the run saved anything, a directory it created is removed again, so
    a failed command leaves nothing behind.

    Examples:
      >>> import tempfile
      >>> from lottojax.experiments.lottery import LotteryConfig
      >>> root = tempfile.mkdtemp()
      >>> try:
      ...     with open_run(root, 'lottery', LotteryConfig()) as workdir:
      ...         raise RuntimeError('dataset missing')
      ... except RuntimeError:
      ...     pass
      >>> os.listdir(root)
      []
    """
    workdir = run_directory(root, experiment, config)
    fresh = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), {"experiment": experiment, **dataclasses.asdict(config)})
    try:
        yield workdir
    except BaseException:
        if fresh and set(os.listdir(workdir)) <= {"config.json"}:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def write_results(workdir: str, summary: dict, arrays: dict) -> None:
    """Writes ``results.json`` and ``results.npz`` atomically (temporary files, then renames)."""
    write_json(os.path.join(workdir, "results.json"), summary)
    tmp = os.path.join(workdir, "results.tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, os.path.join(workdir, "results.npz"))


def read_config(workdir: str) -> dict:
    """The ``config.json`` of a run directory, with a clear error when there is none."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a run directory: it has no config.json")
    with open(path) as f:
        return json.load(f)


def config_from_json(config_cls, saved: dict):
    """Rebuilds a config dataclass from its JSON (lists back to tuples)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        if field.name in saved:
            value = saved[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def stats(values) -> dict:
    """Mean, standard deviation (population, as numpy's default), count and the values.
    Non-finite values (diverged runs) are left out of mean and std and counted.

    Examples:
      >>> stats([0.5, 0.7, float('nan')])
      {'mean': 0.6, 'std': 0.1, 'n': 2, 'diverged': 1, 'per_seed': [0.5, 0.7, nan]}
    """
    values = np.asarray(values, np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    mean = float(np.round(finite.mean(), 12)) if finite.size else None
    std = float(np.round(finite.std(), 12)) if finite.size else None
    return {"mean": mean, "std": std, "n": int(finite.size), "diverged": int(values.size - finite.size),
            "per_seed": values.tolist()}


def mean_std(values, *, scale: float = 100.0, digits: int = 2) -> str:
    """``'mean ± std'`` of the finite values times ``scale``; ``(k diverged)`` appended.

    Examples:
      >>> mean_std([0.90, 0.92])
      '91.00 ± 1.00'
      >>> mean_std([300, 500], scale=1, digits=0)
      '400 ± 100'
    """
    s = stats(values)
    if s["mean"] is None:
        return "diverged"
    text = f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
    return text + (f" ({s['diverged']} diverged)" if s["diverged"] else "")
