"""The robustness experiment end to end on a tiny budget: every ticket at IMP's exact
count, corrupted inputs shared by every arm, drops and geometry consistent with the saved
measurements, outputs written, and a second call resumes without retraining."""
import json
import os

import numpy as np
import pytest

from lottojax.experiments.base import ConfigError
from lottojax.experiments.robustness import RobustnessConfig, robustness_table, run_robustness

TINY = RobustnessConfig(widths=(32, 16), num_steps=40, eval_every=20, batch_size=500, seeds=(0, 1), rounds=2,
                        corruptions=("signal_noise", "shift"))  # 7 steps per epoch: the early-bird arm sees 5 epochs
KERNELS = 40 * 32 + 32 * 16 + 16 * 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_robustness(TINY, root, progress=False)
    return root, summary, workdir


def test_every_ticket_keeps_imp_s_exact_count(run):
    _, summary, _ = run
    alive = KERNELS
    for _ in range(TINY.rounds):  # global IMP: round(0.2 * alive) per round (float32)
        alive -= int(np.round(np.float32(0.2) * np.float32(alive)))
    assert summary["kept"] == alive
    for arm, entry in summary["arms"].items():
        assert entry["density"] == pytest.approx(1.0 if arm == "dense" else alive / KERNELS), arm


def test_measurements_are_consistent(run):
    _, summary, workdir = run
    with np.load(os.path.join(workdir, "results.npz")) as saved:
        for arm, entry in summary["arms"].items():
            clean, corrupted = saved[f"{arm}__clean__accuracy"], saved[f"{arm}__corrupted__accuracy"]
            assert corrupted.shape == (2, 2, 5) and clean.shape == (2,)
            drop = clean[:, None] - corrupted[:, 1]  # shift, every severity
            assert entry["corruptions"]["shift"]["mean_accuracy_drop"]["per_seed"] == pytest.approx(drop.mean(1))
            angle = saved[f"{arm}__corrupted__angle"]
            assert np.all((angle >= 0) & (angle <= np.pi)) and np.all(saved[f"{arm}__clean__feature_norm"] > 0)
        # Noise at severity 5 hurts at least as much as at severity 1 (mean over arms and seeds).
        noise = np.mean([saved[f"{a}__corrupted__accuracy"][:, 0] for a in summary["arms"]], axis=(0, 1))
        assert noise[4] <= noise[0] + 0.02
    assert -1 <= summary["angle_drop_spearman"] <= 1
    assert robustness_table(summary).splitlines()[0].split("|")[2].strip() == "signal_noise"


def test_outputs_and_resume(run):
    root, summary, workdir = run
    for name in ("config.json", "results.json", "results.npz", "robustness.png", "metrics.csv", "dense-params.npz",
                 "arms/synflow.npz"):
        assert os.path.exists(os.path.join(workdir, name)), name
    stamps = {a: os.path.getmtime(os.path.join(workdir, "arms", f"{a}.npz")) for a in summary["arms"]}
    os.remove(os.path.join(workdir, "arms", "magnitude.npz"))  # as if killed while training it
    again, same = run_robustness(TINY, root, progress=False)
    assert same == workdir
    assert again["arms"]["magnitude"]["corruptions"] == summary["arms"]["magnitude"]["corruptions"]
    assert {a: os.path.getmtime(os.path.join(workdir, "arms", f"{a}.npz")) for a in summary["arms"] if a != "magnitude"} \
        == {a: s for a, s in stamps.items() if a != "magnitude"}
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["kept"] == summary["kept"]


def test_early_bird_needs_five_epochs(tmp_path):
    with pytest.raises(ConfigError, match="at least 5"):
        run_robustness(RobustnessConfig(num_steps=100, seeds=(0,)), str(tmp_path), progress=False)


@pytest.mark.parametrize("change, field", [(dict(arms=("imp", "dense")), "arms"), (dict(arms=("magnitude",)), "arms"),
                                           (dict(rounds=0), "rounds"), (dict(imp_rate=1.0), "imp_rate")])
def test_bad_configs_are_named(change, field):
    with pytest.raises(ConfigError) as error:
        RobustnessConfig(**change).check()
    assert error.value.field == field


def test_a_diverged_seed_is_flagged_and_the_other_is_unchanged(run, tmp_path, poison_init, capsys):
    import dataclasses

    _, clean, _ = run
    poison_init(1)
    summary, _ = run_robustness(dataclasses.replace(TINY, arms=("imp",)), str(tmp_path), progress=False)
    arm, before = summary["arms"]["imp"], clean["arms"]["imp"]
    rows = [(arm[k], before[k]) for k in ("clean_accuracy", "mean_accuracy_drop")]
    rows += [(arm["corruptions"][c]["mean_accuracy_drop"], before["corruptions"][c]["mean_accuracy_drop"])
             for c in TINY.corruptions]
    rows += [(arm["clean_geometry"][m], before["clean_geometry"][m]) for m in ("angle", "margin")]
    for row, reference in rows:  # seed 1 is NaN and counted; seed 0 is as in the clean run
        assert row["n"] == 1 and row["diverged"] == 1 and np.isnan(row["per_seed"][1])
        assert row["per_seed"][0] == reference["per_seed"][0]
    assert "(1 diverged)" in robustness_table(summary).splitlines()[1]
    assert "leave out diverged (non-finite) seeds" in capsys.readouterr().err
