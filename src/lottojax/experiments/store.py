"""Run directories, the one results writer, and statistics over seeds.

A run directory is ``<root>/<experiment>-<hash of the config>``: the same config always
lands in the same directory (so a killed run resumes there), a changed one never does.
Fields marked ``extends`` (e.g. ``rounds``) are left out of the hash, so asking a
finished run for more rounds continues it. The directory holds ``config.json``,
``results.json`` (summary: mean, std, n and per-seed values), ``results.npz`` (every
array) and the experiment's checkpoints and plots; all writes are atomic, and their
SHA-256 digests go to ``CHECKSUMS.json`` so that reads detect edited or damaged files.

One run at a time: :func:`open_run` holds an exclusive lock on ``<run dir>/.lock`` (an
``fcntl`` lock, released when the process ends, however it ends), so a second run of the
same config refuses with :class:`RunLockedError` or waits (``wait=``, :func:`waiting`,
``--wait`` on the command line). :func:`exclusive` holds it for a whole ``run_*`` call.
See ``docs/reliability.md``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from lottojax.checkpoint import CorruptFileError, load_npz, read_json, recording, save_npz, write_json

#: ``open_run`` refuses to start with less free space than this in the output root.
MIN_FREE_BYTES = 64 << 20
LOCK_FILE = ".lock"
#: Files a run directory holds before the run saved anything (removed again on failure).
_BOOKKEEPING = {"config.json", LOCK_FILE, "CHECKSUMS.json"}
_wait_seconds: contextvars.ContextVar[float] = contextvars.ContextVar("lottojax_run_lock_wait", default=0.0)
_held: dict[tuple[str, int], list] = {}  # (lock path, thread) -> [fd, depth]


class RunLockedError(RuntimeError):
    """Another process is running in the same run directory."""


@contextlib.contextmanager
def waiting(seconds: float = float("inf")) -> Iterator[None]:
    """Within the block, :func:`open_run` waits up to ``seconds`` for a run directory that
    another process holds, instead of refusing at once (what ``--wait`` does).

    Examples:
      >>> with waiting(5.0):
      ...     _wait_seconds.get()
      5.0
    """
    token = _wait_seconds.set(float(seconds))
    try:
        yield
    finally:
        _wait_seconds.reset(token)


def _holder(lock_path: str) -> str:
    try:
        with open(lock_path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def run_lock(workdir: str, *, wait: Optional[float] = None) -> Iterator[None]:
    """Holds the exclusive lock of ``workdir`` (created if needed) for the block. Another
    process holding it: wait up to ``wait`` seconds (default: :func:`waiting`'s, else 0),
    then raise :class:`RunLockedError` naming the holder. Re-entrant within a thread; the
    lock dies with its process (``fcntl.flock``), so a killed run never leaves it stuck.
    """
    lock_path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    owner = (lock_path, threading.get_ident())
    if owner in _held:
        _held[owner][1] += 1
        try:
            yield
        finally:
            _held[owner][1] -= 1
        return
    wait = _wait_seconds.get() if wait is None else wait
    deadline = time.monotonic() + wait
    while True:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise RunLockedError(
                    f"{workdir} is in use by another run ({_holder(lock_path)}). Wait for it to finish, or run "
                    "with --wait (wait=... / lottojax.experiments.store.waiting() in Python) to wait for it; "
                    "a finished run's results are read back without recomputing.") from None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        try:  # the holder may have removed the directory (a failed fresh run) before we got the lock
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _held[owner] = [fd, 1]
    try:
        yield
    finally:
        del _held[owner]
        os.close(fd)  # releases the lock


def _check_writable(root: str) -> None:
    """Clear errors, before any work, for an output root that cannot be written or is full."""
    existing = os.path.abspath(root)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write the output directory {root}: {existing} is not writable; "
                                            "choose another --out (root) or fix its permissions")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, f"cannot write the output directory {root}: only {free >> 20} MiB free on its "
                                    f"disk (at least {MIN_FREE_BYTES >> 20} MiB needed); free space or choose "
                                    "another --out (root)")


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
def open_run(root: str, experiment: str, config, *, wait: Optional[float] = None) -> Iterator[str]:
    """Creates (or reopens) the run directory, takes its lock (:func:`run_lock`; ``wait``
    seconds for another run to finish, default :func:`waiting`'s or 0) and writes
    ``config.json`` into it. If the body fails before the run saved anything, a directory
    it created is removed again, so a failed command leaves nothing behind. An output root
    that is not writable or has less than :data:`MIN_FREE_BYTES` free is an error before
    anything starts; a ``config.json`` that no longer matches the config is a
    :class:`~lottojax.checkpoint.CorruptFileError`. Writes under the directory are recorded
    (:func:`lottojax.checkpoint.recording`). Nesting it (same thread) is allowed.

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
    _check_writable(root)
    fresh = not os.path.exists(workdir)
    with run_lock(workdir, wait=wait), recording(workdir):
        try:
            _remove_stale_temporaries(workdir)
            path = os.path.join(workdir, "config.json")
            values = {"experiment": experiment, **dataclasses.asdict(config)}
            if os.path.exists(path):
                _check_config(path, values, config)
            write_json(path, values)
            yield workdir
        except BaseException:
            if fresh and set(os.listdir(workdir)) <= _BOOKKEEPING:  # removed while the lock is held
                shutil.rmtree(workdir, ignore_errors=True)
            raise


def _remove_stale_temporaries(workdir: str) -> None:
    """Removes the temporary files of writes cut short by a kill (``.<name>.<random>.tmp*``,
    :func:`lottojax.checkpoint.atomic_path`'s): with the lock held, no write is in progress."""
    for folder, _, files in os.walk(workdir):
        for name in files:
            if name.startswith(".") and ".tmp" in name and name != LOCK_FILE:
                os.remove(os.path.join(folder, name))


def _check_config(path: str, values: dict, config) -> None:
    """``config.json`` must still describe ``config`` (fields that only lengthen a run aside)."""
    saved = json.loads(json.dumps(read_json(path)))
    now = json.loads(json.dumps(values))
    lengthen = {f.name for f in dataclasses.fields(config) if f.metadata.get("extends")}
    changed = sorted(k for k in set(saved) | set(now) if k not in lengthen and saved.get(k) != now.get(k))
    if changed:
        raise CorruptFileError(path, f"does not match this run's config in {changed} (saved, now): "
                                     f"{ {k: (saved.get(k), now.get(k)) for k in changed} }. The directory name is "
                                     "the hash of the config, so the file was edited or written by another version; "
                                     "restore it, or delete the directory to start over.")


def exclusive(experiment: str) -> Callable:
    """Decorates ``run(config, root='runs', ...)`` so that its run directory stays open
    (locked, recorded: :func:`open_run`) for the whole call, the final results and plots
    included; the ``open_run`` inside ``run`` nests in it.

    Examples:
      >>> @exclusive('demo')
      ... def run_demo(config, root='runs'):
      ...     with open_run(root, 'demo', config) as workdir:
      ...         return os.path.exists(os.path.join(workdir, LOCK_FILE))
    """
    def decorate(run: Callable) -> Callable:
        signature = inspect.signature(run)

        @functools.wraps(run)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            config, root = bound.arguments["config"], bound.arguments["root"]
            getattr(config, "check", lambda: None)()  # a bad config creates nothing
            with open_run(root, experiment, config):
                return run(*args, **kwargs)

        return locked

    return decorate


def write_results(workdir: str, summary: dict, arrays: dict) -> None:
    """Writes ``results.json`` and ``results.npz`` atomically (temporary files, then renames),
    their digests recorded; read them back with :func:`read_results`. Every statistic of
    ``summary`` (a :func:`stats` dict) with diverged seeds is reported on stderr and listed
    under ``"diverged"`` in ``results.json``."""
    flagged = diverged_entries(summary)
    if flagged:
        print(f"warning: {len(flagged)} statistics in {workdir} leave out diverged (non-finite) seeds: "
              + "; ".join(f"{name} ({k} of {n + k})" for name, k, n in flagged[:8])
              + (" ..." if len(flagged) > 8 else ""), file=sys.stderr, flush=True)
        summary = dict(summary, diverged=[{"statistic": name, "seeds": k} for name, k, _ in flagged])
    write_json(os.path.join(workdir, "results.json"), summary)
    save_npz(os.path.join(workdir, "results.npz"), arrays)


def load_or_run(path: str, compute: Callable[[], object], *, save: Callable = save_npz,
                load: Callable = load_npz) -> tuple[object, bool]:
    """One resumable unit of an experiment (an arm, a level): ``(value, True)`` when
    ``compute()`` ran now and its value was saved at ``path`` (atomically, its digest
    recorded; by process 0 only), ``(value, False)`` when an earlier call had finished it
    and it was read back with ``load``. A killed run therefore resumes with every unit it
    finished and recomputes only the rest. ``save(path, value)`` and ``load(path)`` default
    to :func:`~lottojax.checkpoint.save_npz` / :func:`~lottojax.checkpoint.load_npz`
    (flat dicts of arrays); e.g. ``write_json`` / ``read_json`` for JSON records.

    Examples:
      >>> import tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), 'arm.npz')
      >>> calls = []
      >>> def train():
      ...     calls.append(1)
      ...     return {'accuracy': np.array([0.5, 0.7])}
      >>> [load_or_run(path, train)[1] for _ in range(2)], len(calls)
      ([True, False], 1)
      >>> load_or_run(path, train)[0]['accuracy']
      array([0.5, 0.7])
    """
    if os.path.exists(path):
        return load(path), False
    value = compute()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save(path, value)
    return value, True


def diverged_entries(summary, prefix: str = "") -> list[tuple[str, int, int]]:
    """``(path, diverged seeds, finite seeds)`` of every :func:`stats` dict in ``summary``
    that left seeds out.

    Examples:
      >>> diverged_entries({'levels': [{'acc': stats([0.5, float('nan')])}]})
      [('levels/0/acc', 1, 1)]
    """
    if isinstance(summary, dict):
        if isinstance(summary.get("diverged"), int) and "per_seed" in summary:
            return [(prefix.rstrip("/"), summary["diverged"], summary["n"])] if summary["diverged"] else []
        return [e for k, v in summary.items() for e in diverged_entries(v, f"{prefix}{k}/")]
    if isinstance(summary, (list, tuple)):
        return [e for i, v in enumerate(summary) for e in diverged_entries(v, f"{prefix}{i}/")]
    return []


def read_results(workdir: str) -> tuple[dict, dict]:
    """``(summary, arrays)`` of a finished run, checked against the digests recorded when
    they were written (:class:`~lottojax.checkpoint.CorruptFileError` naming an edited or
    damaged file)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no results.json: the run has not finished; run it again to resume")
    return read_json(path), load_npz(os.path.join(workdir, "results.npz"))


def read_config(workdir: str) -> dict:
    """The ``config.json`` of a run directory, with a clear error when there is none."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a run directory: it has no config.json")
    return read_json(path)


def config_from_json(config_cls, saved: dict):
    """Rebuilds a config dataclass from its JSON (lists back to tuples)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        if field.name in saved:
            value = saved[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def stats(values, *, diverged=None) -> dict:
    """Mean, standard deviation (population, as numpy's default), count and the values.
    Non-finite values, and values where the boolean ``diverged`` (same shape; e.g. the
    seeds whose loss became NaN or inf, :func:`diverged_runs`) is set, are left out of
    mean and std and counted; their ``per_seed`` entry is ``nan``.

    Examples:
      >>> stats([0.5, 0.7, float('nan')])
      {'mean': 0.6, 'std': 0.1, 'n': 2, 'diverged': 1, 'per_seed': [0.5, 0.7, nan]}
      >>> stats([0.5, 0.7, 0.1], diverged=[False, False, True])['per_seed']
      [0.5, 0.7, nan]
    """
    values = np.asarray(values, np.float64).reshape(-1)
    if diverged is not None:
        values = np.where(np.asarray(diverged, bool).reshape(-1), np.nan, values)
    finite = values[np.isfinite(values)]
    mean = float(np.round(finite.mean(), 12)) if finite.size else None
    std = float(np.round(finite.std(), 12)) if finite.size else None
    return {"mean": mean, "std": std, "n": int(finite.size), "diverged": int(values.size - finite.size),
            "per_seed": values.tolist()}


def diverged_runs(*losses, axis=-1) -> np.ndarray:
    """True for each run whose loss was ever non-finite: ``losses`` (e.g. training and
    validation loss curves) reduced over ``axis`` (the evaluations).

    Examples:
      >>> diverged_runs(np.array([[0.3, 0.2], [0.4, np.inf]]))
      array([False,  True])
    """
    return np.logical_or.reduce([~np.isfinite(np.asarray(x, np.float64)).all(axis=axis) for x in losses])


def mean_std(values, *, scale: float = 100.0, digits: int = 2, diverged=None) -> str:
    """``'mean ± std'`` of the finite values times ``scale``; ``(k diverged)`` appended
    (``diverged`` as for :func:`stats`).

    Examples:
      >>> mean_std([0.90, 0.92])
      '91.00 ± 1.00'
      >>> mean_std([300, 500], scale=1, digits=0)
      '400 ± 100'
      >>> mean_std([0.90, 0.92, 0.1], diverged=[0, 0, 1])
      '91.00 ± 1.00 (1 diverged)'
    """
    s = stats(values, diverged=diverged)
    if s["mean"] is None:
        return "diverged"
    text = f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
    return text + (f" ({s['diverged']} diverged)" if s["diverged"] else "")
