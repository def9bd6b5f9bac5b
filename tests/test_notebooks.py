"""Example notebooks: each executes top to bottom (nbclient) and is stored with its outputs;
IMP's progress bar moves inside a level without changing what the level computes."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lottojax as lj
from lottojax.data import DEBIAN_FASHION_MNIST, Dataset
from lottojax.imp import run_imp
from lottojax.models import create
from lottojax.train import make_trainer

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
NEED_FASHION_MNIST = {"layer_tickets"}  # Debian's dataset-fashion-mnist, which .ci/run installs


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (300, 10))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (10, 4)), -1)
    data = Dataset(*(np.asarray(a) for a in (x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:])))
    model = create("mlp", input_shape=(10,), hidden=(16,), num_classes=4)
    trainer = make_trainer(model, optax.chain(optax.adam(5e-3), lj.masked_updates()), batch_size=20, eval_every=10)
    return trainer, data


def test_progress_bar_moves_inside_each_level_and_changes_nothing(setup, monkeypatch):
    trainer, data = setup
    positions = []  # the bar's position at every evaluation callback
    import tqdm.auto

    class Recording(tqdm.auto.tqdm):
        def update(self, n=1):
            super().update(n)
            positions.append(self.n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    args = dict(seeds=[0, 1], rounds=1, fraction=0.5, num_steps=30, seed_strategy="vmap")
    shown = run_imp(trainer, data, progress=True, **args)
    jax.effects_barrier()
    quiet = run_imp(trainer, data, progress=False, **args)
    for a, b in zip(jax.tree.leaves(shown), jax.tree.leaves(quiet)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # 2 levels x 2 seeds x 3 arms x 3 evaluations (vmapped runs call back one by one):
    # each evaluation moves the bar 1/18 of a level.
    assert len(positions) == 2 * 2 * 3 * 3
    np.testing.assert_allclose(positions[:18], np.arange(1, 19) / 18, atol=1e-9)
    assert sum(0 < p % 1 < 0.99 for p in positions) >= 2 * 16  # moved within each level


def test_trainer_calls_on_evaluation_once_per_evaluation_and_run(setup):
    trainer, data = setup
    steps = []
    train = jax.jit(trainer.train, static_argnames=("num_steps", "on_evaluation"))
    state = jax.vmap(trainer.init)(jax.random.split(jax.random.key(0), 2))
    jax.vmap(lambda s: train(s, data, jax.random.key(1), 0, num_steps=25, on_evaluation=steps.append))(state)
    jax.effects_barrier()
    assert sorted(int(s) for s in steps) == [10, 10, 20, 20, 25, 25]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed_with_outputs(path):
    notebook = json.loads(path.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), "run `python examples/execute.py` to store outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), \
        "every example shows a plot inline"
    widgets = [o for c in code for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not widgets, "progress bars are stored as text (examples/execute.py), readable without widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    if path.stem in NEED_FASHION_MNIST and not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is absent; `apt-get install dataset-fashion-mnist` provides it")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
