"""Do tickets pay? Inference and training speed of IMP tickets: dense vs masked vs compacted vs sparse export.

    python experiments/benchmarks/ticket_speed.py --out ticket_speed.json      # Fashion-MNIST IMP tickets
    python experiments/benchmarks/ticket_speed.py --synthetic --steps 2 --repeats 1   # a smoke run

Tickets: IMP (:func:`lottojax.imp.run_imp`, weight rewinding to θ0, no controls) of
LeNet-300-100 and Conv-2 on Fashion-MNIST (``--synthetic``: random MNIST-shaped data, for
speed) with the LTH paper's per-layer rates (20% of dense layers, 10% of the output layer and
of convolutions per round), ``--steps`` training steps per level (timing does not depend on
accuracy, but the masks are real IMP masks); for each target density (51%, 21%, 8.6%, 3.6%,
1.4%: 3, 7, 11, 15, 19 rounds for LeNet) the level closest to it. ``--tickets magnitude``
instead trains the dense net once and prunes it one-shot, per layer, to each level's
density with the same rates (faster; not IMP's masks).

For each ticket and each batch size (``--batches``, default 1: latency, and 1000:
throughput), four forms of the same network run side by side in one
:func:`lottojax.timing.interleaved` call, each compiled ahead of time on a fixed input with
its weights (and mask) built into the program as constants, as a deployed model's are
(passing a dozen weight arrays per call costs tens of microseconds, as much as a batch-1
forward pass); at batch 1 each timed repeat makes ``--latency-calls`` calls one after
another, each waiting for its result:

- ``dense``: the full network with the dense (unpruned) weights;
- ``masked``: the full network with the mask multiplied in the forward pass (how a ticket
  runs while it is only simulated; the logits are the ticket's; with constant weights and
  mask XLA may fold the product into the weights);
- ``compacted``: :func:`lottojax.compact.compact`'s smaller dense network;
- ``sparse export``: :func:`lottojax.sparse_inference.export_inference` at that batch size
  (``formats='auto'``: each layer of the compacted network in the format measured fastest
  on this machine, the native ``'csr'`` kernel among them where it builds, kept only if the
  whole network then runs faster than with every measured layer dense or every one
  ``'csr'``), run by
  :func:`lottojax.sparse_inference.compile_apply`.

Every form's logits are checked against the masked network's. The summary table gives,
per density and batch, the median time per call of each form, the fastest one, its speedup
over dense and whether sparsity pays here (the paired ratio dense/fastest: its 95% interval
above 1: yes; below 1: NO; straddling: unclear), and, at ≤ 5% density, the issue's target:
the fastest form ≥ 2x faster than dense. Then the training step: ``--train-steps`` steps of
Adam in one compiled scan (batch ``--train-batch``) of the compacted network (its mask
still applied to the updates, so weights pruned inside it stay zero) against the masked
dense step. ``--out`` writes every figure as JSON.

The full run is long (IMP trains ~20 levels of each network, Conv-2's dominate, then 20
inference comparisons of four forms and 10 training comparisons); ``--tickets magnitude``,
fewer ``--densities`` or ``--steps`` shorten it. Run it on a quiet machine: timings on a
CPU shared with other jobs are noise.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lottojax as lj
from lottojax.compact import compact
from lottojax.data import Dataset
from lottojax.imp import level_fraction, run_imp
from lottojax.masks import apply_mask, leaves_with_paths
from lottojax.models import create
from lottojax.sparse_inference import compile_apply, export_inference
from lottojax.timing import Comparison, format_seconds, format_table, interleaved
from lottojax.train import make_trainer

DENSITIES = (0.51, 0.21, 0.086, 0.036, 0.014)
MODELS = ("lenet300100", "conv2")
RATES = dict(conv=0.1, dense=0.2, output=0.1)  # the LTH paper's per-round rates
LEARNING_RATES = {"lenet300100": 1.2e-3, "conv2": 2e-4}
FORMS = ("dense", "masked", "compacted", "sparse export")
TARGET_DENSITY, TARGET_SPEEDUP = 0.05, 2.0


def load_data(args) -> Dataset:
    """Fashion-MNIST (validation and test cut to ``--eval-examples``) or random MNIST-shaped data."""
    if args.synthetic:
        rng = np.random.default_rng(args.seed)
        shape = (args.image_size, args.image_size, 1)
        n, m = args.synthetic_examples, args.eval_examples
        x = rng.normal(size=(n + 2 * m, *shape)).astype(np.float32)
        y = rng.integers(0, 10, n + 2 * m).astype(np.int32)
        return Dataset(x[:n], y[:n], x[n:n + m], y[n:n + m], x[n + m:], y[n + m:])
    data = lj.data.load("fashion-mnist")
    m = args.eval_examples
    return data._replace(x_val=data.x_val[:m], y_val=data.y_val[:m], x_test=data.x_test[:m], y_test=data.y_test[:m])


def predicted_density(params, level: int) -> float:
    """Density of the prunable weights after ``level`` rounds at :data:`RATES` (before rounding)."""
    rate = lj.rates_by_layer(**RATES)
    kept = total = 0.0
    for path, leaf in zip(*leaves_with_paths(params)[:2]):
        if leaf.ndim >= 2:
            kept += leaf.size * (1 - rate(path, leaf)) ** level
            total += leaf.size
    return kept / total


def make_tickets(name: str, data: Dataset, args) -> tuple:
    """(model, state, [ticket dicts: target, level, density, mask, params])."""
    model = create(name, input_shape=data.input_shape, num_classes=data.num_classes)
    params0, state = model.init(jax.random.key(args.seed))
    levels = [min(range(60), key=lambda L: abs(predicted_density(params0, L) - t)) for t in args.densities]
    trainer = make_trainer(model, optax.chain(optax.adam(LEARNING_RATES[name]), lj.masked_updates()),
                           batch_size=args.train_batch, eval_every=args.steps)
    start = time.perf_counter()
    tickets = []
    if args.tickets == "imp":
        result = run_imp(trainer, data, seeds=(args.seed,), rounds=max(levels), fraction=lj.rates_by_layer(**RATES),
                         num_steps=args.steps, controls=(), progress=False)
        for target in args.densities:
            level = result.level_at_density(target)
            mask, params = result.ticket(level, 0)
            tickets.append(dict(target=target, level=level, mask=mask, params=params,
                                accuracy=float(result.early_stop_accuracy[level, 0, 0])))
    else:
        state0 = trainer.init(jax.random.key(args.seed))
        trained, _ = jax.jit(trainer.train, static_argnames="num_steps")(
            state0, data, jax.random.key(args.seed + 1), start=0, num_steps=args.steps)
        rate = lj.rates_by_layer(**RATES)
        for target, level in zip(args.densities, levels):
            fraction = lambda path, leaf, level=level: level_fraction(rate(path, leaf), level, one_shot=True)
            mask = lj.prune_layerwise(lj.magnitude(trained.params), lj.ones_like(trained.params), fraction)
            tickets.append(dict(target=target, level=level, mask=mask, params=trained.params, accuracy=None))
    for t in tickets:  # on the device: a timed call must not copy host arrays in
        t["mask"], t["params"] = jax.device_put((t["mask"], t["params"]))
        t["density"] = float(lj.density(t["mask"]))
    print(f"{name}: {args.tickets} tickets in {time.perf_counter() - start:.0f} s, levels "
          f"{[t['level'] for t in tickets]}, densities {[round(t['density'], 4) for t in tickets]}", flush=True)
    return model, state, tickets


def aot(fn, *args):
    """``fn(*args)`` compiled ahead of time with every argument but the last (the input) built
    into the program as constants, as a deployed model's weights are: a zero-argument callable."""
    *weights, x = args
    compiled = jax.jit(lambda x: fn(*weights, x)).lower(x).compile()
    return lambda: compiled(x)


def full_forms(model, state) -> dict:
    """The jitted dense and masked forward passes of the full network (one per model)."""
    return {"dense": jax.jit(lambda p, x: model.apply(p, state, x, False)[0]),
            "masked": jax.jit(lambda p, m, x: model.apply(apply_mask(p, m), state, x, False)[0])}


def inference_forms(full, ticket, small, exported, x) -> tuple[dict, dict]:
    """form -> zero-argument callable on ``x``, and the max |logit difference| of each form
    from the masked network (the check that they compute the ticket)."""
    params, mask = ticket["params"], ticket["mask"]
    small_model = small.model(x.shape[1:])
    fns = {
        "dense": aot(full["dense"], params, x),
        "masked": aot(full["masked"], params, mask, x),
        "compacted": aot(jax.jit(lambda p, x: small_model.apply(p, small.model_state, x, False)[0]), small.params, x),
    }
    run = compile_apply(exported, x.shape)
    fns["sparse export"] = lambda: run(x)
    reference = np.asarray(fns["masked"]())
    diffs = {form: float(np.max(np.abs(np.asarray(fns[form]()) - reference))) for form in ("compacted", "sparse export")}
    return fns, diffs


def one_after_another(fn, calls: int):
    """``fn`` called ``calls`` times, each waiting for its result (latency, not pipelined)."""
    def run():
        for _ in range(calls):
            jax.block_until_ready(fn())
    return run


def verdict(comparison: Comparison) -> str:
    return {"met": "yes", "NOT MET": "NO", "undecided": "unclear"}[comparison.verdict]


def bench_inference(name, model, state, tickets, args) -> tuple[list, list]:
    comparisons, rows = [], []
    full = full_forms(model, state)
    for ticket in tickets:
        small = compact(name, ticket["params"], ticket["mask"], state, input_shape=model_input_shape(args))
        for batch in args.batches:
            x = jax.random.normal(jax.random.key(batch), (batch, *model_input_shape(args)), jnp.float32)
            exported = export_inference(name, ticket["params"], ticket["mask"], state, batch_size=batch,
                                        repeats=args.auto_repeats, input_shape=model_input_shape(args))
            fns, diffs = inference_forms(full, ticket, small, exported, x)
            calls = args.latency_calls if batch == 1 else 1
            timings = interleaved({f: one_after_another(fn, calls) for f, fn in fns.items()}, repeats=args.repeats,
                                  warmup=1)
            fastest = min(FORMS, key=lambda f: timings[f].median)
            best_sparse = min(FORMS[1:], key=lambda f: timings[f].median)
            title = f"{name} at {ticket['density']:.1%} density, batch {batch}"
            low = ticket["density"] <= TARGET_DENSITY
            main = Comparison(title, "example", batch * calls, {f: timings[f] for f in FORMS}, "dense", best_sparse,
                              f"dense/{best_sparse} (speedup)", (">=", TARGET_SPEEDUP) if low else None,
                              checks={"max |logits - masked logits| (compacted, sparse export)":
                                      (diffs["compacted"], diffs["sparse export"]),
                                      "formats": " ".join(f"{k}={v}" for k, v in exported.formats.items())})
            pays = main._replace(target=(">=", 1.0))
            comparisons.append(main)
            rows.append(dict(
                model=name, target_density=ticket["target"], density=ticket["density"], level=ticket["level"],
                batch=batch, calls_per_repeat=calls, median_s={f: timings[f].median / calls for f in FORMS},
                examples_per_s={f: batch * calls / timings[f].median for f in FORMS},
                fastest=fastest, best_non_dense=best_sparse, speedup=main.ratio, paired_speedup=main.paired_median,
                paired_interval_95=main.paired_interval, pays=verdict(pays),
                target=None if not low else f">= {TARGET_SPEEDUP}x: {main.verdict}",
                formats=exported.formats, skipped=exported.skipped,
                auto_seconds=exported.seconds, network_seconds=exported.network_seconds,
                network_choice=exported.network_choice, max_logit_diff=diffs,
                compacted_params=int(sum(p.size for p in jax.tree.leaves(small.params))),
                comparison=main.as_dict()))
            print(f"  {title}: fastest {fastest}, speedup {main.ratio:.2f}x, formats {exported.formats} "
                  f"(whole network: {exported.network_choice})", flush=True)
    return comparisons, rows


def bench_training(name, model, tickets, args) -> tuple[list, list]:
    comparisons, rows = [], []
    shape = model_input_shape(args)
    rng = np.random.default_rng(args.seed)
    n = args.train_batch * args.train_steps
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    data = jax.device_put(Dataset(x, y, x[:args.train_batch], y[:args.train_batch], x[:args.train_batch],
                                  y[:args.train_batch]))
    key = jax.random.key(args.seed)
    optimizer = optax.chain(optax.adam(LEARNING_RATES[name]), lj.masked_updates())
    trainer = make_trainer(model, optimizer, batch_size=args.train_batch, eval_every=args.train_steps)
    masked_run = jax.jit(trainer.run_steps, static_argnames="num_steps")  # compiles once for every ticket
    for ticket in tickets:
        small = compact(name, ticket["params"], ticket["mask"], input_shape=shape)
        small_trainer = make_trainer(small.model(), optimizer, batch_size=args.train_batch, eval_every=args.train_steps)
        runs = {}
        for label, t, run, mask in (("masked dense", trainer, masked_run, ticket["mask"]),
                                    ("compacted", small_trainer, jax.jit(small_trainer.run_steps, static_argnames="num_steps"),
                                     small.mask)):
            state = t.init(key, mask)
            compiled = run.lower(state, data, key, 0, num_steps=args.train_steps).compile()
            runs[label] = lambda compiled=compiled, state=state: compiled(state, data, key, 0)[0]
        timings = interleaved(runs, repeats=args.repeats, warmup=1)
        c = Comparison(f"{name} at {ticket['density']:.1%} density: training step, batch {args.train_batch}", "step",
                       args.train_steps, timings, "compacted", "masked dense", "compacted/masked dense",
                       checks={"parameters (masked nonzero, compacted)": (
                           int(sum(np.sum(m) for m in jax.tree.leaves(ticket["mask"]))),
                           int(sum(p.size for p in jax.tree.leaves(small.params))))})
        comparisons.append(c)
        rows.append(dict(model=name, target_density=ticket["target"], density=ticket["density"],
                         step_s={k: t.median / args.train_steps for k, t in timings.items()},
                         ratio=c.ratio, paired_ratio=c.paired_median, paired_interval_95=c.paired_interval,
                         comparison=c.as_dict()))
    return comparisons, rows


def model_input_shape(args) -> tuple:
    return (args.image_size, args.image_size, 1) if args.synthetic else (28, 28, 1)


def summary(rows: list, training: list) -> str:
    lines = ["Where tickets pay: median time per call of each form; speedup = dense / fastest form",
             f"  {'model':<12} {'density':>8} {'batch':>6} " + " ".join(f"{f:>13}" for f in FORMS)
             + f"  {'fastest':<13} {'speedup':>8}  {'pays?':<8} target (≤5%: ≥2x)"]
    for r in rows:
        speed = r["median_s"]["dense"] / r["median_s"][r["fastest"]]
        lines.append(f"  {r['model']:<12} {r['density']:>8.1%} {r['batch']:>6} "
                     + " ".join(f"{format_seconds(r['median_s'][f]):>13}" for f in FORMS)
                     + f"  {r['fastest']:<13} {speed:>7.2f}x  {r['pays']:<8} {r['target'] or ''}"
                     + ("   <- sparsity does not pay" if r["pays"] == "NO" else ""))
    lines += ["", "Training step: compacted vs masked dense (median per step)",
              f"  {'model':<12} {'density':>8} {'masked dense':>13} {'compacted':>13} {'ratio':>7}"]
    for r in training:
        lines.append(f"  {r['model']:<12} {r['density']:>8.1%} {format_seconds(r['step_s']['masked dense']):>13} "
                     f"{format_seconds(r['step_s']['compacted']):>13} {r['ratio']:>7.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=lambda s: tuple(s.split(",")), default=MODELS)
    parser.add_argument("--densities", type=lambda s: tuple(float(v) for v in s.split(",")), default=DENSITIES)
    parser.add_argument("--batches", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 1000))
    parser.add_argument("--tickets", choices=("imp", "magnitude"), default="imp")
    parser.add_argument("--synthetic", action="store_true", help="random MNIST-shaped data instead of Fashion-MNIST")
    parser.add_argument("--image-size", type=int, default=28, help="with --synthetic: images are S x S x 1")
    parser.add_argument("--synthetic-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=1000, help="validation and test examples IMP evaluates")
    parser.add_argument("--steps", type=int, default=300, help="training steps per IMP level")
    parser.add_argument("--train-batch", type=int, default=60)
    parser.add_argument("--train-steps", type=int, default=20, help="steps per timed training call")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--latency-calls", type=int, default=100,
                        help="at batch 1, each timed repeat makes this many calls one after another (one call "
                             "takes ~0.1 ms, mostly dispatch: a single one is timer noise); figures are per call")
    parser.add_argument("--auto-repeats", type=int, default=9, help="timed calls per candidate format per layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write every figure as JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"--models {sorted(unknown)} unknown; choose from {MODELS}")
    data = jax.device_put(load_data(args))
    print(f"{'synthetic' if args.synthetic else 'Fashion-MNIST'} {data.input_shape}, {args.tickets} tickets, "
          f"{jax.devices()[0].platform} ({jax.device_count()} device), {args.repeats} repeats\n", flush=True)
    comparisons, rows, training_rows, tickets_out = [], [], [], []
    for name in args.models:
        model, state, tickets = make_tickets(name, data, args)
        start = time.perf_counter()
        c, r = bench_inference(name, model, state, tickets, args)
        comparisons += c
        rows += r
        print(f"{name}: inference cases in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        c, r = bench_training(name, model, tickets, args)
        comparisons += c
        training_rows += r
        print(f"{name}: training cases in {time.perf_counter() - start:.0f} s", flush=True)
        tickets_out += [dict(model=name, target_density=t["target"], level=t["level"], density=t["density"],
                             test_accuracy=t["accuracy"]) for t in tickets]
    print()
    print(format_table(comparisons))
    print()
    print(summary(rows, training_rows))
    results = dict(config=vars(args), device=str(jax.devices()[0]), tickets=tickets_out, inference=rows,
                   training=training_rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
