"""The reprogramming experiment end to end on a tiny budget: outputs are written and a
second call resumes without recomputing; the source tickets have exactly IMP's densities
and are what IMP trained; every run takes its planned steps (a few-shot epoch is n
examples per class); a bad config
names its field; a diverged seed is left out of the statistics and counted."""
import json
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from lottojax.checkpoint import load_arrays
from lottojax.experiments.base import ConfigError, build
from lottojax.experiments.metrics import read_metrics
from lottojax.experiments.reprogram import (ReprogramConfig, central_crop, reprogram_table, run_reprogram,
                                            summarize, target_task)

TINY = ReprogramConfig(seeds=(0, 1), levels=(0, 2), num_steps=60, eval_every=30, reprogram_steps=10,
                       reprogram_evaluations=2, shots=(0, 3))
UNITS = [f"{m}-{s}-level-{l:02d}" for l in (0, 2) for m in ("lp", "vp") for s in ("full", "3shot")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_reprogram(TINY, root, progress=False)
    return root, summary, workdir


def test_outputs_are_written_and_a_second_call_resumes(run):
    root, summary, workdir = run
    files = ["config.json", "results.json", "results.npz", "table.txt", "reprogram.png", "metrics.csv",
             "sources/level-00.npz", "sources/level-02.npz"] + [f"units/{u}.npz" for u in UNITS]
    for path in files:
        assert os.path.exists(os.path.join(workdir, path)), path
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["levels"] == json.loads(json.dumps(summary["levels"]))
    assert {row["unit"] for row in read_metrics(workdir)} >= set(UNITS)
    assert open(os.path.join(workdir, "table.txt")).read().strip() == reprogram_table(summary)
    stamps = {p: os.path.getmtime(os.path.join(workdir, p)) for p in files if p.startswith(("sources", "units"))}
    again, same = run_reprogram(TINY, root, progress=False)
    assert same == workdir and again == summary
    assert stamps == {p: os.path.getmtime(os.path.join(workdir, p)) for p in stamps}


def test_source_tickets_have_imps_exact_densities_and_accuracy(run):
    _, summary, workdir = run
    template = jax.eval_shape(build(TINY).model.init, jax.random.key(0))
    for entry in summary["levels"]:
        level = entry["level"]
        like = dict(params=template[0], model_state=template[1], test_accuracy=0, diverged=0, seconds=0)
        source = load_arrays(os.path.join(workdir, "sources", f"level-{level:02d}.npz"), like)
        kernels = [v for v in jax.tree.leaves(source["params"]) if v.ndim >= 3]  # (seeds, *kernel)
        assert len(kernels) == 3 and all(v.shape[0] == len(TINY.seeds) for v in kernels)
        total = sum(v[0].size for v in kernels)
        kept = sum((v != 0).reshape(len(TINY.seeds), -1).sum(1) for v in kernels)  # per seed
        # The pruned weights stay exactly zero through training: the nonzeros are the mask.
        np.testing.assert_allclose(kept / total, entry["density"], rtol=0, atol=1e-7)  # float32 densities
        # Global pruning of 20% of the remaining weights per round, to the nearest weight.
        assert abs(entry["density"] - 0.8 ** level) <= level / total
        # Retraining the ticket reproduces the run IMP trained at that level.
        assert entry["source_accuracy"]["per_seed"] == pytest.approx(entry["imp_accuracy"]["per_seed"], abs=1e-6)
    assert summary["levels"][0]["density"] == 1.0 and summary["levels"][1]["density"] < 0.65


def test_every_unit_trains_its_planned_steps_and_few_shot_sees_n_per_class(run):
    _, summary, workdir = run
    setup = build(TINY)
    target = target_task(TINY, setup.data)
    full_steps = (len(target.x_train) // 128)  # one epoch: round(10 / 27) -> 1 epoch
    for entry in summary["levels"]:
        for name, m in entry["methods"].items():
            steps = m["curve"]["step"]
            # 3 shots x 10 classes = 30 examples: one step per epoch, so 10 epochs of 1 step.
            assert steps[-1] == (10 if m["shots"] == 3 else full_steps), name
            assert m["accuracy"]["n"] == 2 and 0 <= m["ece"]["mean"] <= 1
    arrays = np.load(os.path.join(workdir, "results.npz"))
    mapping = arrays["vp/3shot/level-00/mapping"]
    assert mapping.shape == (2, 10) and all(len(set(row)) == 10 for row in mapping.tolist())  # one-to-one
    prompt = arrays["vp/full/level-00/trainable/"]
    assert prompt.shape == (2, 40) and (prompt[:, 5:35] == 0).all() and (prompt[:, :5] != 0).all()


def test_target_task_is_a_reversed_cropped_relabelled_mnist1d():
    setup = build(TINY)
    target = target_task(TINY, setup.data)
    assert target.x_train.shape[1:] == (30,) and target.num_classes == 10
    assert not np.array_equal(target.x_test, central_crop(np.asarray(setup.data.x_test)[:, ::-1], 30))  # other seed
    assert sorted(np.unique(target.y_train).tolist()) == list(range(10))
    assert np.array_equal(central_crop(np.arange(40)[None, ::-1], 30)[0], np.arange(34, 4, -1))


@pytest.mark.parametrize("field, value", [("levels", ()), ("levels", (0, 0)), ("imp_rate", 1.0), ("shots", (-1,)),
                                          ("methods", ("lp", "lp")), ("reprogram_steps", 0), ("target_length", 0),
                                          ("reprogram_learning_rate", 0.0)])
def test_bad_config_names_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"^{field}"):
        run_reprogram(ReprogramConfig(**{**TINY.__dict__, field: value}), str(tmp_path), progress=False)


def test_a_target_longer_than_the_source_input_names_target_length(tmp_path):
    with pytest.raises(ConfigError, match="^target_length: 41 exceeds"):
        run_reprogram(ReprogramConfig(**{**TINY.__dict__, "target_length": 41}), str(tmp_path), progress=False)


def test_a_diverged_seed_is_left_out_and_counted(run):
    _, summary, workdir = run
    arrays = np.load(os.path.join(workdir, "results.npz"))
    units = {}
    for level in TINY.levels:
        for method in TINY.methods:
            for shots, tag in ((0, "full"), (3, "3shot")):
                prefix = f"{method}/{tag}/level-{level:02d}/"
                units[(level, method, shots)] = {k[len(prefix):]: np.array(v) for k, v in arrays.items()
                                                 if k.startswith(prefix)}
    units[(2, "vp", 0)]["history/['test_loss']"][1, -1] = np.nan  # seed 1 of one unit blew up
    density = np.zeros((3, 2))
    for e in summary["levels"]:
        density[e["level"]] = e["density"]
    imp = SimpleNamespace(density=density, final_accuracy=np.full((3, 2, 1), 0.5))
    sources = {e["level"]: {"test_accuracy": np.array(e["source_accuracy"]["per_seed"]),
                            "diverged": np.zeros(2, bool)} for e in summary["levels"]}
    flagged = summarize(TINY, imp, sources, units)
    vp = flagged["levels"][1]["methods"]["vp-full"]
    original = summary["levels"][1]["methods"]["vp-full"]
    assert vp["accuracy"]["n"] == 1 and vp["accuracy"]["diverged"] == 1 and np.isnan(vp["accuracy"]["per_seed"][1])
    assert vp["accuracy"]["mean"] == pytest.approx(original["accuracy"]["per_seed"][0])
    lp = summary["levels"][1]["methods"]["lp-full"]["accuracy"]
    assert flagged["levels"][1]["methods"]["lp-full"]["accuracy"] == lp  # the other units are untouched
    assert "(1 div.)" in reprogram_table(flagged)
