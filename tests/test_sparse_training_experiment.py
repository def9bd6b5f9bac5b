"""The sparse-training experiment end to end on a tiny budget: every method reaches its
density, FLOPs follow the stated cost model, IMP shares θ0 and data order with dense
training, outputs are written and a second call resumes."""
import json
import os

import pytest

from lottojax.experiments.metrics import read_metrics
from lottojax.experiments.sparse_training import ARMS, SparseTrainingConfig, run_sparse_training, sparse_training_table

TINY = SparseTrainingConfig(widths=(32, 16), num_steps=40, eval_every=20, seeds=(0, 1), densities=(0.5, 0.25),
                            imp_rate=0.5, update_every=10, gmp_every=10, gmp_begin=0.25, gmp_end=0.75)
KERNELS = (40 * 32, 32 * 16, 16 * 10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_sparse_training(TINY, root, progress=False)
    return root, summary, workdir


def test_every_method_reaches_each_density_with_the_stated_cost(run):
    _, summary, _ = run
    methods = summary["methods"]
    assert set(methods) == set(ARMS)
    total = sum(KERNELS)
    for name, arm in methods.items():
        for record, target in zip(arm["records"], (1.0,) if name == "dense" else TINY.densities):
            assert record["target"] == target
            assert record["accuracy"]["n"] == 2 and 0.0 <= record["accuracy"]["mean"] <= 1.0
            # Every layer keeps its share (uniform) or ERK's: the total is the target, to rounding.
            assert record["density"]["per_seed"] == pytest.approx([target] * 2, abs=3 / total), name
    flops = {name: [r["flops"] for r in arm["records"]] for name, arm in methods.items()}
    density = {name: [r["density"]["mean"] for r in arm["records"]] for name, arm in methods.items()}
    assert flops["dense"] == [1.0]
    assert flops["static"] == pytest.approx(density["static"]) and flops["set"] == pytest.approx(density["set"])
    assert flops["ste"] == pytest.approx([(2 * d + 1) / 3 for d in density["ste"]])
    updates = len(range(10, 30, 10))  # drop-and-grow events before T_end = 30 (step 0 draws the mask)
    assert flops["rigl"] == pytest.approx([(3 * d * (40 - updates) + updates * (2 * d + 1)) / 120 for d in density["rigl"]])
    # IMP pays every level: 1 (dense) + 0.5, then + 0.25.
    for mode in ("imp", "imp-lr", "imp-finetune"):
        assert flops[mode] == pytest.approx([1.5, 1.75], abs=3 / total)
        assert [r["level"] for r in methods[mode]["records"]] == [1, 2]
    # GMP: dense until step 10, then the cubic ramp to the target at step 30, held to the end.
    for target, cost in zip(TINY.densities, flops["gmp"]):
        s = lambda t: (1 - target) * (1 - (1 - (t - 10) / 20) ** 3)
        expected = (10 * 1.0 + sum(10 * (1 - s(t)) for t in (10, 20)) + 10 * target) / 40
        assert cost == pytest.approx(expected, abs=1e-6)


def test_imp_level_zero_is_the_dense_run(run):
    """Same θ0, data order and trainer: IMP's dense level is the dense method's run."""
    _, summary, _ = run
    dense = summary["methods"]["dense"]["records"][0]["accuracy"]["per_seed"]
    for mode in ("imp", "imp-lr", "imp-finetune"):
        assert summary["methods"][mode]["curve"][0]["accuracy"]["per_seed"] == dense


def test_metrics_log_every_run_and_imp_level(run):
    _, summary, workdir = run
    rows = read_metrics(workdir)
    units = list(dict.fromkeys(r["unit"] for r in rows))
    assert units[0] == "dense" and "rigl-erk-0.25" in units and "ste-0.5" in units and "imp-lr-level-02" in units
    # Each unit: every seed and evaluation; the last evaluation is the accuracy the summary reports.
    rigl = [r for r in rows if r["unit"] == "rigl-erk-0.25"]
    assert len(rigl) == len(TINY.seeds) * (TINY.num_steps // TINY.eval_every)
    final = [float(r["test_accuracy"]) for r in rigl if int(r["step"]) == TINY.num_steps]
    assert final == pytest.approx(summary["methods"]["rigl"]["records"][1]["accuracy"]["per_seed"])


def test_outputs_are_written_and_a_second_call_resumes(run):
    root, summary, workdir = run
    for name in ("config.json", "results.json", "sparse_training.png", "arms/rigl.json", "imp-lr"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["methods"]["rigl"] == summary["methods"]["rigl"]
    stamps = {m: os.path.getmtime(os.path.join(workdir, "arms", f"{m}.json")) for m in ARMS}
    again, same = run_sparse_training(TINY, root, progress=False)
    assert same == workdir and again["methods"] == summary["methods"]
    assert stamps == {m: os.path.getmtime(os.path.join(workdir, "arms", f"{m}.json")) for m in ARMS}
    lines = sparse_training_table(summary).splitlines()
    assert [line.split()[0] for line in lines[1:]] == list(TINY.methods)


def test_conv_models_are_refused_for_flop_counting(tmp_path):
    with pytest.raises(ValueError, match="not a dense kernel"):
        run_sparse_training(SparseTrainingConfig(model="cnn1d", methods=("dense",), seeds=(0,), num_steps=400),
                            str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []  # no run directory left behind


def test_a_diverged_seed_is_flagged_not_averaged(tmp_path):
    """A seed whose loss becomes non-finite gets accuracy NaN: stats leaves it out and counts it."""
    import numpy as np

    from lottojax.experiments.base import build, make_optimizer
    from lottojax.experiments.sparse_training import _seed_trainer
    from lottojax.experiments.store import stats
    from lottojax.optim import get_mask
    from lottojax.train import make_trainer

    config = SparseTrainingConfig(widths=(8,), num_steps=20, eval_every=10, seeds=(0, 1))
    setup = build(config)
    exploding = make_optimizer("sgd", 1e30)  # the loss overflows within a few steps
    trainer = make_trainer(setup.model, exploding, batch_size=config.batch_size, eval_every=config.eval_every)
    train = _seed_trainer(config, setup.data, str(tmp_path))
    accuracy, _ = train(trainer, lambda state: get_mask(state.opt_state), "exploding")
    assert np.isnan(accuracy).all()
    assert stats(accuracy)["n"] == 0 and stats(accuracy)["diverged"] == 2
    fine, _ = train(setup.trainer, lambda state: get_mask(state.opt_state), "fine")
    assert np.isfinite(fine).all() and stats(fine)["diverged"] == 0
