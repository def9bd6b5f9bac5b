"""XLA:CPU's matrix-product library: the default (YNN fusions) vs XLA's own dot emitter.

    python experiments/benchmarks/xla_cpu_dots.py [--repeats 9] [--steps 300]

On CPU, XLA hands matrix products to YNNPACK by default (the HLO shows ``ynn_fusion``).
The compile option ``xla_cpu_experimental_ynn_fusion_type=''`` turns that off, so products
go to XLA's own (Eigen) dot emitter. Which is faster depends on the shapes and the CPU;
this measures it for the reference training steps, each case ``jit(Trainer.run_steps)``
on random data, the two compilations of the same function interleaved (medians per step
after warm-up; ratio off/default, below 1 means turning YNN off is faster).

To use the faster setting for a whole run, set it before JAX starts::

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python experiments/lottery.py

or per function, ``jax.jit(f, compiler_options={'xla_cpu_experimental_ynn_fusion_type': ''})``.
The two compilations sum in a different order, so their losses agree only to float32
rounding at first and drift apart over steps, as any two correct programs may.
"""
from __future__ import annotations

import argparse
from typing import NamedTuple

import jax
import numpy as np
import optax

from lottojax.data import Dataset
from lottojax.models import create
from lottojax.timing import Comparison, format_table, interleaved
from lottojax.train import make_trainer

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


class Case(NamedTuple):
    name: str
    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    optimizer: optax.GradientTransformation


CASES = (
    Case("MNIST-1D MLP, batch 32, Adam", "mlp", (40,), 32, optax.adam(1e-3)),
    Case("MNIST-1D MLP, batch 128, Adam", "mlp", (40,), 128, optax.adam(1e-3)),
    Case("LeNet-300-100, batch 60, Adam", "lenet300100", (784,), 60, optax.adam(1.2e-3)),
    Case("CNN1D, batch 100, SGD momentum", "cnn1d", (40, 1), 100, optax.sgd(0.1, momentum=0.9)),
)


def random_data(input_shape: tuple[int, ...], n: int = 2000) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((n, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return jax.device_put(Dataset(x, y, x[:100], y[:100], x[:100], y[:100]))


def compare(case: Case, steps: int, repeats: int) -> Comparison:
    data = random_data(case.input_shape)
    trainer = make_trainer(create(case.model, input_shape=case.input_shape), case.optimizer,
                           batch_size=case.batch_size, eval_every=steps)
    state = trainer.init(jax.random.key(0))
    run = lambda state: trainer.run_steps(state, data, jax.random.key(1), 0, num_steps=steps)
    default, ynn_off = jax.jit(run), jax.jit(run, compiler_options=YNN_OFF)
    timings = interleaved({"XLA default (YNN fusions)": lambda: default(state),
                           "YNN off (XLA dot emitter)": lambda: ynn_off(state)}, repeats=repeats)
    losses = [np.asarray(f(state)[1]) for f in (default, ynn_off)]
    default_label, off_label = timings
    return Comparison(
        f"{case.name} ({steps} steps per call)", "step", steps, timings, off_label, default_label, "off/default",
        checks={"first-step loss difference": float(abs(losses[0][0] - losses[1][0])),
                "mean loss over the call (default, off)": (float(losses[0].mean()), float(losses[1].mean()))},
    )


def main(argv=None) -> list[Comparison]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per timed call")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if jax.default_backend() != "cpu":
        raise SystemExit(f"this benchmark is about XLA:CPU; the default backend is {jax.default_backend()}")
    comparisons = [compare(case, args.steps, args.repeats) for case in CASES]
    print(format_table(comparisons))
    return comparisons


if __name__ == "__main__":
    main()
