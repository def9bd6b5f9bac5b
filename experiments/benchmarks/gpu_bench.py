"""The GPU benchmarks behind ``experiments/benchmarks/gpu.sh`` (runs on CPU too, with ``--quick``).

    python experiments/benchmarks/gpu_bench.py --out runs/gpu             # a GPU, a few minutes
    python experiments/benchmarks/gpu_bench.py --quick --out /tmp/gpu     # any machine, tiny sizes

Three parts, each written to ``<--out>/gpu_bench.json`` as soon as it finishes:

1. **seeds**: per-seed cost of training many seeds in one vmapped program
   (``lottojax.seeds.map_seeds(strategy='vmap')`` over ``Trainer.run_steps``, batch 60,
   Adam with ``masked_updates``) for LeNet-300-100 (784 inputs) and Conv-2 (28x28x1) at
   1, 8, 64 and 512 seeds: median seconds per seed-step (interleaved repeats after
   warm-up), and XLA's memory per seed (state, i.e. params and optimizer state, and the
   program's temporaries, from ``compile().memory_analysis()``). A seed count that does
   not fit in memory is recorded as failed and the rest go on.
2. **steps**: one seed's training step (``run_steps``) of Conv-2 (28x28x1, batch 60) and
   ResNet-20 (32x32x3, batch 128) with the convolutions of ``conv_impl='auto'`` (native
   on an accelerator) and ``'patches'``, interleaved.
3. The device, JAX version and the sizes used.

The lottery job itself is started by ``gpu.sh``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Optional

import jax
import numpy as np
import optax

import lottojax as lj
from lottojax.data import Dataset
from lottojax.models import create
from lottojax.seeds import map_seeds
from lottojax.timing import interleaved
from lottojax.train import make_trainer

SEED_MODELS = {"lenet300100": (784,), "conv2": (28, 28, 1)}
STEP_MODELS = {"conv2": ((28, 28, 1), 60), "resnet20": ((32, 32, 3), 128)}


def random_data(input_shape, n: int) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return jax.device_put(Dataset(x, y, x[:16], y[:16], x[:16], y[:16]))


def memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("temp", "argument", "output")}


def seeds_part(args) -> list[dict]:
    rows = []
    for name, input_shape in SEED_MODELS.items():
        data = random_data(input_shape, 20 * args.batch)
        trainer = make_trainer(create(name, input_shape=input_shape), optax.chain(optax.adam(1e-3), lj.masked_updates()),
                               batch_size=args.batch, eval_every=args.steps)
        train = map_seeds(lambda s, d, k: trainer.run_steps(s, d, k, 0, args.steps)[1], in_axes=(0, None, 0),
                          strategy="vmap")
        for seeds in args.seeds:
            row = {"model": name, "seeds": seeds, "steps": args.steps, "batch": args.batch}
            try:
                keys = jax.random.split(jax.random.key(0), seeds)
                states = jax.jit(jax.vmap(trainer.init))(keys)
                start = time.perf_counter()
                compiled = jax.jit(train).lower(states, data, keys).compile()
                row["compile_s"] = time.perf_counter() - start
                mem = memory(compiled)
                state_bytes = sum(x.nbytes for x in jax.tree.leaves(states))
                timing = interleaved({"vmap": lambda: compiled(states, data, keys)}, repeats=args.repeats,
                                     warmup=1)["vmap"]
                row.update(
                    per_seed_step_s=timing.median / seeds / args.steps, per_step_s=timing.median / args.steps,
                    timing=timing.as_dict(seeds * args.steps), state_bytes_per_seed=state_bytes / seeds,
                    memory_bytes=mem, temp_bytes_per_seed=mem.get("temp", 0) / seeds)
                print(f"seeds  {name:12s} {seeds:4d} seeds  {row['per_seed_step_s'] * 1e3:9.4f} ms per seed-step  "
                      f"state {row['state_bytes_per_seed'] / 2**20:7.2f} MiB/seed  "
                      f"temp {row['temp_bytes_per_seed'] / 2**20:7.2f} MiB/seed", flush=True)
                del states, compiled
            except Exception as err:  # out of memory at a large seed count: record it, go on
                row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
                print(f"seeds  {name:12s} {seeds:4d} seeds  FAILED {row['error'][:200]}", flush=True)
            rows.append(row)
    return rows


def steps_part(args) -> list[dict]:
    rows = []
    for name, (input_shape, batch) in STEP_MODELS.items():
        batch = args.batch if args.quick else batch
        data = random_data(input_shape, 4 * batch)
        fns, mems = {}, {}
        for impl in ("auto", "patches"):
            trainer = make_trainer(create(name, input_shape=input_shape, conv_impl=impl),
                                   optax.chain(optax.adam(1e-3), lj.masked_updates()), batch_size=batch,
                                   eval_every=args.steps)
            state = trainer.init(jax.random.key(0))
            compiled = jax.jit(lambda s, d, t=trainer: t.run_steps(s, d, jax.random.key(1), 0, args.steps)[1]).lower(
                state, data).compile()
            fns[impl] = (lambda c, s: lambda: c(s, data))(compiled, state)
            mems[impl] = memory(compiled)
        timings = interleaved(fns, repeats=args.repeats, warmup=1)
        row = {"model": name, "input_shape": list(input_shape), "batch": batch, "steps": args.steps,
               "per_step_s": {k: t.median / args.steps for k, t in timings.items()},
               "timings": {k: t.as_dict(args.steps) for k, t in timings.items()}, "memory_bytes": mems}
        cells = "  ".join(f"{k} {v * 1e3:8.3f} ms" for k, v in row["per_step_s"].items())
        print(f"steps  {name:12s} batch {batch:4d}  {cells}", flush=True)
        rows.append(row)
    return rows


def parse_args(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU check of the script)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 1 8 64 512; quick 1 2")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed call; default 50, quick 2")
    parser.add_argument("--repeats", type=int, default=None, help="default 5, quick 1")
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--parts", nargs="+", default=["seeds", "steps"], choices=["seeds", "steps"])
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or ([1, 2] if quick else [1, 8, 64, 512])
    args.steps = args.steps or (2 if quick else 50)
    args.repeats = args.repeats or (1 if quick else 5)
    if quick:
        args.batch = min(args.batch, 8)
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_bench.json")
    result = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "jax": jax.__version__, "python": sys.version.split()[0], "machine": platform.node(),
              "config": vars(args)}
    print(f"backend {result['backend']}: {result['devices']}", flush=True)
    for part in args.parts:
        start = time.perf_counter()
        try:
            result[part] = {"seeds": seeds_part, "steps": steps_part}[part](args)
        except Exception:
            result[part] = {"error": traceback.format_exc()[-2000:]}
            print(result[part]["error"], flush=True)
        result[f"{part}_wall_s"] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
