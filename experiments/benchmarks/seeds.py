"""Per-seed cost of training many seeds: vmapped, sequential and sharded over devices.

    python experiments/benchmarks/seeds.py                       # LeNet-300-100 and CNN1D, 1..16 seeds
    python experiments/benchmarks/seeds.py --models cnn1d --seeds 1 4 16 --steps 100
    python experiments/benchmarks/seeds.py --models conv2 --seeds 2 --steps 20 --repeats 3   # a conv net

For each model and seed count it times one jitted call that trains every seed for
``--steps`` steps (``Trainer.run_steps``, batch 60, Adam, ``masked_updates``), by:

- ``loop``: a Python loop over the seeds, each a jitted single-seed call (the baseline);
- ``map``: ``lottojax.seeds.map_seeds(strategy='map')``, seeds one after another in one program;
- ``vmap``: ``map_seeds(strategy='vmap')``, one batched program;
- ``vmap×D`` / ``map×D``: the same with the seeds split across the D devices
  (``devices='all'``; on a CPU, ``--host-devices`` sets how many the host exposes).

It prints the median time per seed-step (interleaved repeats after warm-up), each strategy's
ratio to the loop, and XLA's memory figures per seed for the vmapped program (arguments and
outputs, i.e. params and optimizer state, plus its temporaries). Figures go to
``runs/benchmarks/seeds.json``.
"""
from __future__ import annotations

import os
import sys


def _host_devices(argv) -> int:
    """``--host-devices N`` must act before JAX is imported (it sets XLA_FLAGS)."""
    if "--host-devices" in argv:
        return int(argv[argv.index("--host-devices") + 1])
    return os.cpu_count() or 1


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_host_devices(sys.argv)}")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

import lottojax as lj  # noqa: E402
from lottojax.data import Dataset  # noqa: E402
from lottojax.models import create  # noqa: E402
from lottojax.seeds import map_seeds, put_seeded  # noqa: E402
from lottojax.timing import format_seconds, interleaved  # noqa: E402
from lottojax.train import make_trainer  # noqa: E402

MODELS = {"lenet300100": (784,), "cnn1d": (40,), "conv2": (28, 28, 1)}
DEFAULT_MODELS = ("lenet300100", "cnn1d")


def synthetic_data(input_shape, n_train: int = 3000) -> Dataset:
    x = jax.random.normal(jax.random.key(0), (n_train, *input_shape))
    y = jax.random.randint(jax.random.key(1), (n_train,), 0, 10)
    return Dataset(x, y, x[:100], y[:100], x[:100], y[:100])


def strategies(trainer, data, steps: int, devices: int) -> dict:
    """name -> function(states, keys) training every seed for ``steps`` steps."""
    train = lambda state, data, key: trainer.run_steps(state, data, key, 0, steps)[0]
    single = jax.jit(train)
    out = {
        "loop": lambda states, keys: [single(jax.tree.map(lambda a: a[i], states), data, keys[i]) for i in range(len(keys))],
    }
    for name in ("map", "vmap"):
        out[name] = (lambda f: lambda states, keys: f(states, data, keys))(
            jax.jit(map_seeds(train, in_axes=(0, None, 0), strategy=name)))
    if devices > 1:
        replicated = put_seeded(data, "all", stacked=False)
        for name in ("map", "vmap"):
            f = jax.jit(map_seeds(train, in_axes=(0, None, 0), strategy=name, devices="all"))
            out[f"{name}×{devices}"] = (lambda f: lambda states, keys: f(states, replicated, keys))(f)
    return out


def memory_per_seed(trainer, data, steps: int, seeds: int, states, keys) -> dict:
    train = jax.jit(map_seeds(lambda s, d, k: trainer.run_steps(s, d, k, 0, steps)[0], in_axes=(0, None, 0)))
    stats = train.lower(states, data, keys).compile().memory_analysis()
    if stats is None:
        return {}
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(states)) / seeds
    return {"state_MB_per_seed": state_bytes / 2**20, "temp_MB_per_seed": stats.temp_size_in_bytes / seeds / 2**20}


def bench_model(name: str, seed_counts, steps: int, repeats: int) -> list[dict]:
    input_shape = MODELS[name]
    data = jax.device_put(synthetic_data(input_shape))
    trainer = make_trainer(create(name, input_shape=input_shape), optax.chain(optax.adam(1e-3), lj.masked_updates()),
                           batch_size=60, eval_every=steps)
    devices = jax.device_count()
    rows = []
    for seeds in seed_counts:
        keys = jax.random.split(jax.random.key(0), seeds)
        states = jax.vmap(trainer.init)(keys)
        fns = strategies(trainer, data, steps, devices if seeds % devices == 0 else 1)
        timings = interleaved({k: (lambda f: lambda: f(states, keys))(f) for k, f in fns.items()}, repeats=repeats)
        per = {k: t.median / seeds / steps for k, t in timings.items()}
        row = {"model": name, "seeds": seeds, "per_seed_step_s": per,
               "ratio_to_loop": {k: v / per["loop"] for k, v in per.items()},
               **memory_per_seed(trainer, data, steps, seeds, states, keys)}
        rows.append(row)
        cells = "  ".join(f"{k} {format_seconds(v)} ({row['ratio_to_loop'][k]:.2f})" for k, v in per.items())
        print(f"{name:12s} seeds {seeds:3d}  {cells}  state {row.get('state_MB_per_seed', 0):.2f} MB/seed", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), choices=list(MODELS),
                        help="conv2 (opt-in: slow) shows vmap's cost for convolutions on a CPU")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--host-devices", type=int, default=None, help="CPU devices (read before JAX starts)")
    parser.add_argument("--out", default="runs/benchmarks/seeds.json")
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices; per seed-step time (ratio to loop)")
    rows = [row for name in args.models for row in bench_model(name, args.seeds, args.steps, args.repeats)]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"backend": jax.default_backend(), "devices": jax.device_count(), "steps": args.steps,
                   "repeats": args.repeats, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
