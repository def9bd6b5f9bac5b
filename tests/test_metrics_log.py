"""Per-evaluation metrics logging: CSV rows match the history, re-runs replace instead of
duplicating, TensorBoard events carry the same scalars (the main job's own metrics.csv is
checked in test_experiments)."""
import glob
import os
import struct

import numpy as np
import pytest

from lottojax.experiments.metrics import history_rows, log_history, read_metrics
from lottojax.train import History


def _history(seeds: int, evals: int, offset: float = 0.0) -> History:
    step = np.broadcast_to(np.arange(1, evals + 1) * 10, (seeds, evals))
    values = [offset + np.arange(seeds * evals, dtype=np.float32).reshape(seeds, evals) + k for k in range(5)]
    return History(step, *values)


def test_rows_follow_the_index_axes_then_evaluations():
    rows = history_rows(_history(2, 3), {"seed": (4, 9)})
    assert [(r["seed"], r["step"]) for r in rows] == [(4, 10), (4, 20), (4, 30), (9, 10), (9, 20), (9, 30)]
    # field k of History (after step) was built as arange + k: row i of train_loss is i.
    assert [r["train_loss"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["test_accuracy"] for r in rows] == [4, 5, 6, 7, 8, 9]
    # A dict works too; a step row shared by every seed is broadcast.
    rows = history_rows({"step": np.array([5, 10]), "loss": np.array([[1.0, 2.0], [3.0, 4.0]])}, {"seed": (0, 1)})
    assert [(r["seed"], r["step"], r["loss"]) for r in rows] == [(0, 5, 1.0), (0, 10, 2.0), (1, 5, 3.0), (1, 10, 4.0)]


def test_an_index_that_does_not_match_the_history_is_refused():
    with pytest.raises(ValueError, match=r"history.step has shape \(2, 3\).*expects \(3,\) followed by"):
        history_rows(_history(2, 3), {"seed": (0, 1, 2)})
    with pytest.raises(ValueError, match="no 'step' field"):
        history_rows({"loss": np.zeros((1, 2))}, {"seed": (0,)})
    with pytest.raises(ValueError, match="unit="):
        log_history("/tmp", "a/b", _history(1, 1), {"seed": (0,)})


def test_a_rerun_unit_replaces_its_rows_and_keeps_first_logged_order(tmp_path):
    workdir = str(tmp_path)
    log_history(workdir, "level-01", _history(1, 2), {"seed": (0,)})
    log_history(workdir, "level-00", _history(1, 2), {"seed": (0,)})
    log_history(workdir, "level-01", _history(1, 2, offset=100.0), {"seed": (0,)}, density=0.8)
    rows = read_metrics(workdir)
    assert [r["unit"] for r in rows] == ["level-01", "level-01", "level-00", "level-00"]
    assert [float(r["train_loss"]) for r in rows] == [100.0, 101.0, 0.0, 1.0]
    assert rows[0]["density"] == "0.8" and rows[2]["density"] == ""
    assert sorted(os.listdir(tmp_path)) == ["metrics", "metrics.csv"] + (["tensorboard"] if _has_tbx() else [])


def _has_tbx() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboardX") is not None


def _scalars(path: str) -> dict:
    """Reads a TFRecord event file by hand (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_events_hold_the_same_scalars_and_reruns_replace_them(tmp_path):
    pytest.importorskip("tensorboardX")
    workdir = str(tmp_path)
    for _ in range(2):
        log_history(workdir, "level-00", _history(2, 2), {"seed": (0, 1)})
    files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "level-00", "*", "events.*")))
    assert [os.path.basename(os.path.dirname(f)) for f in files] == ["seed-0", "seed-1"]
    scalars = _scalars(files[1])
    assert scalars["train_loss"] == [(10, 2.0), (20, 3.0)]
    assert scalars["test_accuracy"] == [(10, 6.0), (20, 7.0)]

