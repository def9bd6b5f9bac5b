"""The pruning-at-init experiment end to end on a tiny budget: matched densities, one θ0
per seed shared with IMP, connectivity, outputs, resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax.models import create
from lottojax.experiments.metrics import read_metrics
from lottojax.experiments.prune_at_init import PruneAtInitConfig, input_output_paths, prune_at_init_table, run_prune_at_init

# Three methods cover the three ways of building a mask (per-layer ERK fractions, one
# global score, the traced SynFlow schedule); snip/grasp differ only in the score, tested
# in test_scores_at_init.py.
METHODS_RUN = ("random-erk", "magnitude", "synflow")
TINY = PruneAtInitConfig(num_steps=20, eval_every=10, levels=(1, 3), seeds=(0, 1), synflow_rounds=4, methods=METHODS_RUN)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_prune_at_init(TINY, root, progress=False)
    return root, summary, workdir


def test_every_method_matches_the_imp_density_exactly(run):
    _, summary, _ = run
    total = 40 * 300 + 300 * 100 + 100 * 10
    for row, level in zip(summary["compared"], TINY.levels):
        kept = imp_kept(total, level)
        assert round(row["density"] * total) == kept
        assert set(row["methods"]) == set(METHODS_RUN)
        for method, r in row["methods"].items():
            assert r["density"]["per_seed"] == [kept / total] * 2, method  # ERK too: exact total
            assert len(r["early_stop_accuracy"]["per_seed"]) == 2 and r["disconnected_seeds"] == 0


def imp_kept(total: int, level: int) -> int:
    """Global IMP at 20% per round: each round removes round(0.2 * alive) (float32)."""
    alive = total
    for _ in range(level):
        alive -= int(np.round(np.float32(0.2) * np.float32(alive)))
    return alive


def test_outputs_are_written_and_a_second_call_resumes(run):
    root, summary, workdir = run
    for name in ("config.json", "results.json", "results.npz", "prune_at_init.png", "method-synflow.npz"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["compared"] == summary["compared"]
    stamps = {m: os.path.getmtime(os.path.join(workdir, f"method-{m}.npz")) for m in METHODS_RUN}
    again, same_dir = run_prune_at_init(TINY, root, progress=False)
    assert same_dir == workdir and again["compared"] == summary["compared"]
    assert stamps == {m: os.path.getmtime(os.path.join(workdir, f"method-{m}.npz")) for m in METHODS_RUN}
    table = prune_at_init_table(summary)
    assert table.splitlines()[0].split() == ["density", "|", "imp", *METHODS_RUN]


def test_metrics_log_every_imp_level_and_method_evaluation(run):
    _, summary, workdir = run
    rows = read_metrics(workdir)
    units = list(dict.fromkeys(r["unit"] for r in rows))
    assert units == [f"imp-level-{k:02d}" for k in range(max(TINY.levels) + 1)] + [f"method-{m}" for m in METHODS_RUN]
    evals = TINY.num_steps // TINY.eval_every
    synflow = [r for r in rows if r["unit"] == "method-synflow"]
    assert len(synflow) == len(TINY.levels) * len(TINY.seeds) * evals
    # The last evaluation of each (level, seed) is the final accuracy the summary reports.
    finals = {(r["level"], r["seed"]): float(r["test_accuracy"]) for r in synflow if int(r["step"]) == TINY.num_steps}
    for row, level in zip(summary["compared"], TINY.levels):
        per_seed = row["methods"]["synflow"]["final_accuracy"]["per_seed"]
        assert [finals[(str(level), str(s))] for s in TINY.seeds] == pytest.approx(per_seed)


def test_input_output_paths_count_and_detect_collapse():
    model = create("mlp", input_shape=(40,))
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    dense = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    paths = jax.jit(lambda mask: input_output_paths(model, mask, state, (40,)))
    assert float(paths(dense)) == 40 * 300 * 100 * 10
    cut = dict(dense, fc1={"kernel": jnp.zeros((300, 100), bool), "bias": dense["fc1"]["bias"]})
    assert float(paths(cut)) == 0.0


def test_unknown_method_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"methods: 'snap' is not one of"):
        run_prune_at_init(PruneAtInitConfig(methods=("snap",)), str(tmp_path))
