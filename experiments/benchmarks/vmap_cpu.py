"""Why vmapped seeds can cost more per seed than sequential ones on a CPU (LeNet-300-100).

    python experiments/benchmarks/vmap_cpu.py [--seeds 8] [--repeats 9]

Two measurements, each ``vmap`` against ``lax.map`` over the same seeds (medians of
interleaved repeats after warm-up, per seed):

1. the step's three matrix-product forms alone, for the first layer (``60x784 @ 784x300``:
   forward ``x W``, input gradient ``g W^T``, weight gradient ``x^T g``), batched over the
   seeds vs one product per seed;
2. 20 training steps with growing work per step: gradients only, plain SGD, and Adam.

If (1) shows batched products as fast as single ones while (2) shows ``vmap`` falling
behind as the per-step work over all seeds' weights grows, the cost is in memory traffic
over the stacked weights and optimizer state, not in the products.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from lottojax.models import create
from lottojax.seeds import map_seeds
from lottojax.timing import interleaved

BATCH, EXAMPLES, STEPS = 60, 600, 20


def product_cases(seeds: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (seeds, BATCH, 784))
    w = jax.random.normal(jax.random.key(1), (seeds, 784, 300))
    g = jax.random.normal(jax.random.key(2), (seeds, BATCH, 300))
    forms = {"x W": (lambda x, w, g: x @ w), "g W^T": (lambda x, w, g: g @ w.T), "x^T g": (lambda x, w, g: x.T @ g)}
    cases = {}
    for name, form in forms.items():
        for strategy in ("map", "vmap"):
            run = jax.jit(map_seeds(form, in_axes=(0, 0, 0), strategy=strategy))
            cases[f"{name}|{strategy}"] = lambda run=run: run(x, w, g)
    return cases


def training_cases(seeds: int) -> dict:
    model = create("lenet300100", input_shape=(784,))
    x = jax.random.normal(jax.random.key(0), (EXAMPLES, 784))
    y = jnp.arange(EXAMPLES) % 10
    keys = jax.random.split(jax.random.key(0), seeds)
    params = jax.vmap(lambda k: model.init(k)[0])(keys)

    def gradient(p, key, i):
        idx = jax.random.randint(jax.random.fold_in(key, i), (BATCH,), 0, EXAMPLES)
        logits = lambda p: model.apply(p, {}, x[idx], True)[0]
        return jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p), y[idx]).mean())(p)

    adam = optax.adam(1e-3)

    def steps(kind):
        def run(p, key):
            def body(carry, i):
                if kind == "gradients":  # at fixed weights: forward and backward only
                    return jax.tree.map(jnp.add, carry, gradient(p, key, i)), None
                if kind == "sgd":
                    return jax.tree.map(lambda a, b: a - 0.01 * b, carry, gradient(carry, key, i)), None
                weights, state = carry
                updates, state = adam.update(gradient(weights, key, i), state, weights)
                return (optax.apply_updates(weights, updates), state), None

            first = {"gradients": jax.tree.map(jnp.zeros_like, p), "sgd": p, "adam": (p, adam.init(p))}[kind]
            return jax.lax.scan(body, first, jnp.arange(STEPS))[0]

        return run

    cases = {}
    for kind in ("gradients", "sgd", "adam"):
        for strategy in ("map", "vmap"):
            run = jax.jit(map_seeds(steps(kind), in_axes=(0, 0), strategy=strategy))
            cases[f"{kind}|{strategy}"] = lambda run=run: run(params, keys)
    return cases


def report(title: str, cases: dict, seeds: int, repeats: int, per: int) -> None:
    timings = interleaved(cases, repeats=repeats, warmup=1)
    print(f"\n{title}\n{'':12s} {'map':>12s} {'vmap':>12s} {'vmap/map':>9s}")
    for name in dict.fromkeys(label.split("|")[0] for label in cases):
        m, v = timings[f"{name}|map"].median, timings[f"{name}|vmap"].median
        print(f"{name:12s} {m / seeds / per * 1e6:9.0f} µs {v / seeds / per * 1e6:9.0f} µs {v / m:9.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()}, {args.seeds} seeds, medians of {args.repeats} interleaved repeats, per seed")
    report("1 first-layer products (per seed and product)", product_cases(args.seeds), args.seeds, args.repeats, 1)
    report(f"2 training (per seed-step, {STEPS} steps of batch {BATCH})", training_cases(args.seeds), args.seeds,
           args.repeats, STEPS)


if __name__ == "__main__":
    main()
