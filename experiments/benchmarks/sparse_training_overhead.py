"""What each sparse-training method's mask update costs per step, against the masked dense step.

    python experiments/benchmarks/sparse_training_overhead.py                 # LeNet-300-100, batch 60
    python experiments/benchmarks/sparse_training_overhead.py --repeats 9 --steps 200 --model mlp

Every case trains ``--steps`` steps of Adam at 10% density in one compiled scan
(``Trainer.run_steps``) on random data of the model's input shape, from the same state:

- ``masked dense``: ``chain(adam, masked_updates(mask))``, the step every mask costs;
- ``static``, ``gmp``, ``set``, ``rigl``: :func:`lottojax.sparse_training` with its mask
  update every ``--every`` steps (the papers' ΔT = 100), and again with an update at
  *every* step (``/1``: the cost of one update, paid each step);
- ``ste``: the magnitude mask recomputed in every forward pass (:func:`lottojax.ste_model`).

Cases run interleaved after a warm-up call (compiled ahead of time); the table gives the
median per step, the spread, and the ratio to the masked dense step with its 95% interval.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import lottojax as lj
from lottojax.data import Dataset
from lottojax.models import create
from lottojax.timing import Comparison, format_table, interleaved
from lottojax.train import make_trainer

DENSITY = 0.1


def schedules(every: int, steps: int) -> dict:
    """method -> its schedule with updates every ``every`` steps (GMP ramps over the run)."""
    sparsity = 1.0 - DENSITY
    return {
        "static": lj.one_shot(sparsity, at_step=0),
        "gmp": lj.cubic(sparsity, begin_step=0, end_step=max(1, (steps - 1) // every) * every, every=every),
        "set": lj.periodic(sparsity, every=every),
        "rigl": lj.periodic(sparsity, every=every),
    }


def cases(model_name: str, batch: int, steps: int, every: int) -> tuple[dict, dict]:
    """case label -> zero-argument callable (one compiled run of ``steps`` steps), and the
    density each case ends at (the check that all did the same kind of work)."""
    input_shape = (784,) if model_name == "lenet300100" else (40,)
    model = create(model_name, input_shape=input_shape)
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.normal(size=(n, *input_shape)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    data = jax.device_put(Dataset(x, y, x[:batch], y[:batch], x[:batch], y[:batch]))
    key, data_key = jax.random.key(0), jax.random.key(1)
    params = model.init(key)[0]
    mask = lj.prune_with("random", params, lj.ones_like(params), key=key, keep=int(DENSITY * sum(
        p.size for p in jax.tree.leaves(params) if p.ndim >= 2)), scope="uniform")

    def compiled(trainer, mask=None):
        state = trainer.init(key, mask)
        run = jax.jit(trainer.run_steps, static_argnames="num_steps").lower(
            state, data, data_key, 0, num_steps=steps).compile()
        return (lambda: run(state, data, data_key, 0)[0]), state

    trainers = {"masked dense": (make_trainer(model, optax.chain(optax.adam(1e-3), lj.masked_updates()),
                                              batch_size=batch, eval_every=steps), mask)}
    for label, ev in ((f"/{every}", every), ("/1", 1)):
        for method, schedule in schedules(ev, steps).items():
            if method == "static" and ev == 1:
                continue  # static never updates
            tx = lj.sparse_training(optax.adam(1e-3), method, schedule, scope="uniform")
            trainers[method + ("" if method == "static" else label)] = (
                make_trainer(model, tx, batch_size=batch, eval_every=steps), None)
    trainers["ste"] = (make_trainer(lj.ste_model(model, sparsity=1 - DENSITY), optax.adam(1e-3), batch_size=batch,
                                    eval_every=steps), None)
    runs, densities = {}, {}
    for label, (trainer, start_mask) in trainers.items():
        run, _ = compiled(trainer, start_mask)
        runs[label] = run
        final = run()
        final_mask = (lj.ste_mask(final.params, sparsity=1 - DENSITY) if label == "ste"
                      else lj.get_mask(final.opt_state))
        densities[label] = round(float(lj.density(final_mask)), 4)
    return runs, densities


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet300100", choices=("lenet300100", "mlp"))
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--steps", type=int, default=200, help="steps per timed call")
    parser.add_argument("--every", type=int, default=100, help="steps between mask updates (ΔT)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    runs, densities = cases(args.model, args.batch, args.steps, args.every)
    timings = interleaved(runs, repeats=args.repeats)
    print(f"{args.model}, Adam, batch {args.batch}, {DENSITY:.0%} density, {args.steps} steps per call, "
          f"{jax.devices()[0].platform}, {args.repeats} repeats\n")
    comparisons = [
        Comparison(f"{label} vs masked dense", "step", args.steps,
                   {"masked dense": timings["masked dense"], label: timings[label]}, label, "masked dense",
                   f"{label}/masked dense", checks={"final density": (densities["masked dense"], densities[label])})
        for label in runs if label != "masked dense"
    ]
    print(format_table(comparisons))


if __name__ == "__main__":
    main()
