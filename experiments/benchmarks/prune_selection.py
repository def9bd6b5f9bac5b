"""Exact lowest-k selection in pruning: the bisection select of lottojax.prune vs a lexsort.

    python experiments/benchmarks/prune_selection.py [--repeats 7]

Every global or layerwise pruning call selects the ``count`` lowest-scoring alive entries
(ties by index). lottojax does it with 32 counting passes (a bisection over the float
bits) instead of a 3-key sort; this script times both on flat score vectors of several
sizes, one vector and 30 vmapped ones, and the 100-round SynFlow mask of the MNIST-1D MLP
(30 masks vmapped, as in experiments/prune_at_init.py). Cases run interleaved after a
warm-up call; the table gives medians, their ratio, and the compile time of each.
Both selections return the same mask (checked).
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import jax
import jax.numpy as jnp

import lottojax as lj
from lottojax import prune
from lottojax.timing import interleaved


def lexsort_lowest_alive(scores, alive, count):
    """The sort-based reference: (dead last, score, index) lexsort, first ``count``."""
    key = jnp.where(jnp.isnan(scores), -jnp.inf, scores).astype(jnp.float32)
    index = jnp.arange(scores.shape[0], dtype=jnp.int32)
    order = jnp.lexsort((index, key, ~alive))
    return jnp.zeros_like(alive).at[order].set(index < count, unique_indices=True)


def compiled(fn, *args):
    """(the compiled ``jit(fn)`` for ``args``, seconds spent compiling)."""
    start = time.perf_counter()
    executable = jax.jit(fn).lower(*args).compile()
    return executable, time.perf_counter() - start


def timed(fns: dict, repeats: int) -> dict:
    """name -> median seconds over ``repeats`` interleaved calls, after one warm-up call."""
    return {name: timing.median for name, timing in interleaved(fns, repeats=repeats).items()}


def selection_cases(size: int, batch: int):
    scores = jax.random.normal(jax.random.key(0), (batch, size))
    alive = jax.random.uniform(jax.random.key(1), (batch, size)) < 0.7
    count = jnp.full((batch,), int(0.2 * 0.7 * size), jnp.int32)
    cases = {name: compiled(jax.vmap(select), scores, alive, count)
             for name, select in (("lexsort", lexsort_lowest_alive), ("bisection", prune.lowest_alive))}
    same = bool(jnp.all(cases["lexsort"][0](scores, alive, count) == cases["bisection"][0](scores, alive, count)))
    return {k: (lambda c=c: c(scores, alive, count)) for k, (c, _) in cases.items()}, {k: t for k, (_, t) in cases.items()}, same


def synflow_cases():
    from lottojax.models import create

    model = create("mlp", input_shape=(40,))
    keys = jax.random.split(jax.random.key(0), 30)
    params, state = jax.vmap(model.init)(keys)
    one_state = jax.tree.map(lambda x: x[0], state)
    apply_fn = lambda p, x: model.apply(p, one_state, x, False)[0]
    masks = lambda p: lj.synflow_mask(p, apply_fn=apply_fn, input_shape=(40,), density=0.01, rounds=100)
    new, new_compile = compiled(jax.vmap(masks), params)
    with mock.patch.object(prune, "lowest_alive", lexsort_lowest_alive):
        old, old_compile = compiled(jax.vmap(masks), params)
    same = all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(new(params)), jax.tree.leaves(old(params))))
    return {"lexsort": lambda: old(params), "bisection": lambda: new(params)}, {"lexsort": old_compile, "bisection": new_compile}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for size, batch in [(43_000, 1), (43_000, 30), (270_000, 1), (270_000, 30), (2_700_000, 1)]:
        fns, compile_s, same = selection_cases(size, batch)
        rows.append((f"select n={size:,} x{batch}", timed(fns, args.repeats), compile_s, same))
    fns, compile_s, same = synflow_cases()
    rows.append(("synflow_mask MLP 100 rounds x30", timed(fns, max(2, args.repeats // 3)), compile_s, same))
    print(f"{'case':<34} {'lexsort':>10} {'bisection':>10} {'ratio':>7}  {'compile lexsort / bisection':>28}  same")
    for name, t, c, same in rows:
        ls, bs = t["lexsort"], t["bisection"]
        print(f"{name:<34} {ls * 1e3:8.1f}ms {bs * 1e3:8.1f}ms {ls / bs:6.1f}x  {c['lexsort']:14.2f}s / {c['bisection']:.2f}s  {same}")
    print(f"\n(median of repeats after warm-up; devices: {jax.devices()}; other processes may share the CPU)")


if __name__ == "__main__":
    main()
