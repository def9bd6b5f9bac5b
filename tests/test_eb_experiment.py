"""The Early-Bird experiment end to end on the CIFAR-10 VGG path (TFDS mock data: the real
data cannot be downloaded here), resuming, and its configuration checks."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from lottojax.experiments.base import ConfigError
from lottojax.experiments.early_bird import EarlyBirdConfig, eb_table, run_early_bird
from lottojax.experiments.metrics import read_metrics

CONFIG = EarlyBirdConfig(
    model="vgg11", widths=(6,) * 8, dataset="tfds:cifar10", validation=8, epochs=3,
    batch_size=8, ratios=(0.5,), window=2, eps=1.0, seeds=(0,), epochs_per_call=2,
)


def test_cifar10_vgg_pipeline_on_mock_data_and_resume(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        summary, workdir = run_early_bird(CONFIG, str(tmp_path), progress=False)
        retrained = json.load(open(os.path.join(workdir, "checkpoint", "retrain.json")))
        again, _ = run_early_bird(CONFIG, str(tmp_path), progress=False)  # resumes: nothing left to train
    assert json.load(open(os.path.join(workdir, "checkpoint", "retrain.json"))) == retrained
    for name in ("config.json", "results.json", "results.npz", "heatmap.png"):
        assert os.path.exists(os.path.join(workdir, name))
    row = summary["ratios"]["0.5"]
    assert row["eb_epoch"] == [2] and row["found"] == 1  # eps = 1: fires as soon as the window (2) is full
    assert summary["search"]["epochs_run"] == 2 and summary["search"]["stopped"] == [2]
    for mode in ("continue", "reinit"):
        m = row["modes"][mode]
        assert m["collapsed"] == 0 and 0 <= m["test_accuracy"]["mean"] <= 1
        assert m["kept_fraction"]["per_seed"] == [24 / 48]  # round(0.5 * 48) channels go
        for widths in m["widths"]:
            assert sum(widths["widths"]) == 24 and len(widths["widths"]) == 8
    # 2 dense epochs, then the half-width net for 1 epoch (continue) or all 3 (reinit).
    assert row["modes"]["continue"]["flops_saving"] > 1
    assert row["modes"]["continue"]["flops_saving"] > row["modes"]["reinit"]["flops_saving"]
    assert again["ratios"]["0.5"]["eb_epoch"] == row["eb_epoch"]
    for mode in ("continue", "reinit"):
        assert again["ratios"]["0.5"]["modes"][mode]["test_accuracy"] == row["modes"][mode]["test_accuracy"]
    assert summary["dense"]["step_flops"] > 0 and summary["search"]["detection_flops_per_epoch"] > 0
    assert row["modes"]["continue"]["step_time_ratio"]["mean"] > 0
    distances = np.load(os.path.join(workdir, "results.npz"))["distance_matrix"]
    assert distances.shape == (1, 1, 3, 3) and np.all(np.diagonal(distances, axis1=2, axis2=3) == 0)
    assert "0.5" in eb_table(summary)
    # Per-epoch metrics: the dense run (logged per chunk, 3 epochs), each retraining's epochs.
    rows = read_metrics(workdir)
    assert [(r["unit"], r["seed"]) for r in rows if r["unit"] == "dense"] == [("dense", "0")] * 3
    assert sum(r["unit"] == "retrain-0.5-seed0-continue" for r in rows) == 1
    reinit = [float(r["test_accuracy"]) for r in rows if r["unit"] == "retrain-0.5-seed0-reinit"]
    assert len(reinit) == 3 and reinit[-1] == pytest.approx(row["modes"]["reinit"]["test_accuracy"]["mean"])


@pytest.mark.parametrize(
    "change, field",
    [(dict(mask="filter"), "mask"), (dict(retrain=("finetune",)), "retrain"), (dict(ratios=(1.0,)), "ratios"),
     (dict(search_bits=1), "search_bits"), (dict(model="resnet20", widths=(8,)), "widths"),
     (dict(seeds=(1, 1)), "seeds"), (dict(epochs=0), "epochs")],
)
def test_bad_configs_are_rejected_before_any_work(tmp_path, change, field):
    config = EarlyBirdConfig(**{**CONFIG.__dict__, "dataset": "no-such-dataset", **change})
    with pytest.raises(ConfigError) as error:
        run_early_bird(config, str(tmp_path), progress=False)
    assert error.value.field == field
    assert not list(tmp_path.iterdir())


SHARDED_EXPERIMENT = """
import json, sys
from lottojax.experiments.early_bird import EarlyBirdConfig, run_early_bird
config = EarlyBirdConfig(widths=(4, 4), epochs=3, batch_size=250, ratios=(0.5,), window=2, eps=1.0, seeds=(0, 1, 2),
                         retrain=(), epochs_per_call=2, devices=sys.argv[2] or None)
summary, _ = run_early_bird(config, sys.argv[1], progress=False)
json.dump(summary, open(sys.argv[1] + "/summary.json", "w"))
"""


def test_experiment_sharded_over_two_devices_matches_one_device(tmp_path, cpu_devices_env):
    """``devices='all'``: 3 seeds padded to 4 over 2 devices; the padding seed is dropped and
    every per-seed result equals the one-device run's."""
    env = cpu_devices_env(2)
    summaries = {}
    for devices in ("all", ""):
        out = tmp_path / (devices or "one")
        out.mkdir()
        done = subprocess.run([sys.executable, "-c", SHARDED_EXPERIMENT, str(out), devices], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries[devices] = json.load(open(out / "summary.json"))
    sharded, one = summaries["all"], summaries[""]
    assert sharded["ratios"]["0.5"]["eb_epoch"] == one["ratios"]["0.5"]["eb_epoch"] == [2, 2, 2]
    assert sharded["search"]["stopped"] == one["search"]["stopped"] == [2, 2, 2]
    dense = lambda s: s["dense"]["test_accuracy"]["per_seed"]
    assert len(dense(one)) == 3 and dense(sharded) == dense(one)


def test_a_diverged_seed_is_flagged_in_the_summary_and_table(capsys):
    """Seed 1's dense run and search became NaN: its dense accuracy and its ticket are NaN,
    left out of the means and counted; seed 0's figures are its own."""
    from types import SimpleNamespace

    from lottojax.eb_train import EpochLoopState
    from lottojax.experiments.early_bird import _summarise
    from lottojax.experiments.store import write_results
    from lottojax.train import History

    config = EarlyBirdConfig(epochs=3, ratios=(0.5,), seeds=(0, 1), retrain=("continue",))
    loss = np.array([[0.9, 0.8, 0.7], [0.9, np.nan, np.nan]])
    step = np.array([[10, 20, 30], [10, 20, 30]])
    record = History(step, loss, loss, np.full((2, 3), 0.5), loss, np.array([[.3, .5, .8], [.3, .1, .1]]))
    state = lambda stopped: EpochLoopState(np.int32(3), None, np.array(stopped), record,
                                           SimpleNamespace(epoch=np.array([[2], [2]])), None, None)
    run = dict(eb_epoch=2, epochs=1, step_flops=50.0, step_seconds=1.0, dense_step_seconds=2.0, seconds=0.1,
               kept_fraction=0.5, widths={}, collapsed=[])
    retrained = {"0.5/0/continue": dict(run, test_accuracy=0.75), "0.5/1/continue": dict(run, test_accuracy=0.6)}
    summary = _summarise(config, state([-1, -1]), state([2, 2]), retrained, 10, dict(step_flops=100.0,
                         detection_flops=0.0), 1.0, 1.0)
    dense, ticket = summary["dense"]["test_accuracy"], summary["ratios"]["0.5"]["modes"]["continue"]
    assert dense["per_seed"][0] == 0.8 and np.isnan(dense["per_seed"][1]) and dense["diverged"] == 1
    assert ticket["test_accuracy"]["per_seed"][0] == 0.75 and np.isnan(ticket["test_accuracy"]["per_seed"][1])
    assert ticket["test_accuracy"]["diverged"] == 1 and ticket["accuracy_minus_dense"] == pytest.approx(-0.05)
    assert ticket["train_flops"]["n"] == 2  # what a diverged ticket cost still counts
    lines = eb_table(summary).splitlines()
    assert lines[0].startswith("dense: 80.00 ± 0.00 (1 diverged)") and "75.00 ± 0.00 (1 diverged)" in lines[2]
    write_results(tempfile.mkdtemp(), summary, {})
    assert "dense/test_accuracy (1 of 2)" in capsys.readouterr().err
