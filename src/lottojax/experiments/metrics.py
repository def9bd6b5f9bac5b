"""Per-evaluation metrics of a run, written as each unit (an IMP level, an arm) finishes.

Every experiment calls :func:`log_history` when a unit is saved, so a long run can be
watched while it goes: ``<run dir>/metrics.csv`` holds one row per evaluation (unit, the
unit's index labels such as seed and arm, step, and the :class:`lottojax.train.History`
fields), and, when ``tensorboardX`` is installed (``pip install tensorboardX``), the same
scalars go to TensorBoard event files under ``<run dir>/tensorboard/<unit>/<labels>/``
(``tensorboard --logdir <run dir>/tensorboard``).

Writing is idempotent: each unit is its own file ``metrics/<unit>.csv``, replaced
atomically, and ``metrics.csv`` is rebuilt from them, so a unit re-run after a crash
replaces its rows instead of duplicating them.
"""
from __future__ import annotations

import csv
import io
import itertools
import os
import shutil
from typing import Mapping, Sequence

import numpy as np

from lottojax.checkpoint import atomic_path

_INDEX = "metrics/index.txt"  # unit names in the order they were first logged


def history_rows(history, index: Mapping[str, Sequence]) -> list[dict]:
    """One dict per evaluation of a history whose leaves are ``(*index axes, evals)``: a
    :class:`lottojax.train.History`, any NamedTuple of curves or a dict of arrays with a
    ``step`` field (e.g. :class:`lottojax.grokking.Curves`); a leaf without some leading
    axes is broadcast over them. Rows with ``step < 0`` (not trained, as in
    :class:`lottojax.eb_train.EpochLoopState`'s record) are left out.

    ``index`` names the leading axes and labels their entries, in axis order.

    Examples:
      >>> from lottojax.train import History
      >>> h = History(*[np.arange(4.0).reshape(2, 2)] * 6)
      >>> rows = history_rows(h, {"seed": [0, 7]})
      >>> [(r["seed"], r["step"], r["test_accuracy"]) for r in rows]
      [(0, 0, 0.0), (0, 1, 1.0), (7, 2, 2.0), (7, 3, 3.0)]
    """
    named = history._asdict() if hasattr(history, "_asdict") else dict(history)
    if "step" not in named:
        raise ValueError(f"history has no 'step' field (fields: {sorted(named)})")
    shape = tuple(len(labels) for labels in index.values())
    evals = np.shape(named["step"])[-1]
    fields = {}
    for name, value in named.items():
        try:  # a leaf may leave out leading axes it shares, e.g. one step row for every seed
            fields[name] = np.broadcast_to(np.asarray(value), (*shape, evals))
        except ValueError:
            raise ValueError(f"history.{name} has shape {np.shape(value)}; index {dict(zip(index, shape))} "
                             f"expects {shape} followed by the evaluation axis ({evals})") from None
    rows = []
    for position in itertools.product(*(range(n) for n in shape)):
        labels = {axis: _plain(list(index[axis])[i]) for axis, i in zip(index, position)}
        for e in range(fields["step"].shape[-1]):
            if fields["step"][position + (e,)] < 0:  # a row not (yet) trained, as in an epoch loop's record
                continue
            row = dict(labels, step=int(fields["step"][position + (e,)]))
            row.update({name: float(value[position + (e,)]) for name, value in fields.items() if name != "step"})
            rows.append(row)
    return rows


def log_history(workdir: str, unit: str, history, index: Mapping[str, Sequence], **constants) -> None:
    """Writes (or rewrites) ``unit``'s evaluations to ``workdir``'s metrics (see the module
    docstring); ``constants`` (e.g. ``density=0.8``) become columns of every row.

    Examples:
      >>> import tempfile
      >>> from lottojax.train import History
      >>> workdir = tempfile.mkdtemp()
      >>> h = History(*[np.ones((1, 2))] * 6)
      >>> log_history(workdir, "level-00", h, {"seed": [0]}, density=1.0)
      >>> log_history(workdir, "level-00", h, {"seed": [0]}, density=1.0)  # a re-run replaces
      >>> print(open(os.path.join(workdir, "metrics.csv")).read().splitlines()[:2])
      ['unit,seed,step,train_loss,val_loss,val_accuracy,test_loss,test_accuracy,density', 'level-00,0,1,1.0,1.0,1.0,1.0,1.0,1.0']
      >>> len(open(os.path.join(workdir, "metrics.csv")).read().splitlines())
      3
    """
    if not unit or os.sep in unit or unit.startswith("."):
        raise ValueError(f"unit={unit!r} must be a plain file name (no '{os.sep}', not empty)")
    rows = [dict({"unit": unit}, **row, **constants) for row in history_rows(history, index)]
    os.makedirs(os.path.join(workdir, "metrics"), exist_ok=True)
    _write_csv(os.path.join(workdir, "metrics", f"{unit}.csv"), rows)
    units = _units(workdir)
    if unit not in units:
        units.append(unit)
        with atomic_path(os.path.join(workdir, _INDEX)) as tmp, open(tmp, "w") as f:
            f.write("".join(u + "\n" for u in units))
    _rebuild(workdir, units)
    _tensorboard(workdir, unit, rows, list(index))


def read_metrics(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.csv`` (values as strings, as :mod:`csv` reads them)."""
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _plain(label):
    return label.item() if isinstance(label, np.generic) else label


def _units(workdir: str) -> list[str]:
    path = os.path.join(workdir, _INDEX)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _write_csv(path: str, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(_csv_text(rows, _columns(rows)))


def _rebuild(workdir: str, units: list[str]) -> None:
    rows = []
    for unit in units:
        path = os.path.join(workdir, "metrics", f"{unit}.csv")
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows.extend(csv.DictReader(f))
    _write_csv(os.path.join(workdir, "metrics.csv"), rows)


def _tensorboard(workdir: str, unit: str, rows: list[dict], axes: list[str]) -> None:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return
    root = os.path.join(workdir, "tensorboard", unit)
    shutil.rmtree(root, ignore_errors=True)  # a re-run unit replaces its events
    writers = {}
    for row in rows:
        key = tuple(row[a] for a in axes)
        if key not in writers:
            name = "_".join(f"{a}-{row[a]}" for a in axes) or "run"
            writers[key] = SummaryWriter(os.path.join(root, name))
        for column, value in row.items():
            if column not in ("unit", "step", *axes) and isinstance(value, float):
                writers[key].add_scalar(column, value, row["step"])
    for writer in writers.values():
        writer.close()


def log_imp_level(workdir: str, level: int, result, *, prefix: str = "") -> None:
    """:func:`log_history` for one level of :func:`lottojax.run_imp` (its ``on_level``
    callback: ``on_level=functools.partial(log_imp_level, workdir)``): unit
    ``<prefix>level-NN``, rows per seed and arm, with the level's mean density."""
    history = type(result.history)(*(np.asarray(leaf)[level] for leaf in result.history))
    log_history(workdir, f"{prefix}level-{level:02d}", history, {"seed": result.seeds, "arm": result.arms},
                density=float(np.mean(result.density[level])))
