"""Foundation benchmarks: what masking, scanning, vmapping and compiling cost or buy.

    python experiments/benchmarks/foundation.py                     # Fashion-MNIST, a few minutes
    python experiments/benchmarks/foundation.py --dataset synthetic # MNIST-shaped random data
    python experiments/benchmarks/foundation.py --repeats 9 --imp-steps 2000 --torch-threads 1

The PyTorch comparison needs the ``[torch]`` extra (``pip install -e ".[torch]"``);
without torch (or with ``--no-torch``) that comparison is skipped with a message.

All four comparisons use LeNet-300-100 (784-300-100-10, Glorot-normal kernels) with Adam
(learning rate 1.2e-3) on minibatches of 60, and time each case as the median over
``--repeats`` calls after ``--warmup`` untimed calls (compilation), the cases of a
comparison interleaved. Every timed JAX call is blocked on.

1. **masked vs dense step**: ``jit(Trainer.run_steps)`` over ``--step-steps`` steps (one
   ``lax.scan``) with ``optax.chain(optax.adam, lottojax.masked_updates())`` holding a
   mask of ``--density`` (magnitude-pruned per layer at θ0; set by ``Trainer.init(key,
   mask)``) vs the same program with plain ``optax.adam``, both from θ0 on the same
   batches. Ratio masked/dense per step; target <= 1.02.
2. **scanned epoch vs Python loop**: one epoch (``n_train // 60`` steps) as one
   ``jit(run_steps)`` call vs a Python loop calling ``jit(Trainer.step)`` once per step on
   ``x_train[idx]`` (indices on the host, data on the device) with the same batches in
   the same order. Ratio loop/scan per epoch.
3. **8 seeds vmapped vs sequential**: ``jit(vmap(run_steps))`` over ``--seeds`` seeds for
   ``--seed-steps`` steps vs a Python loop over the seeds of the single-seed
   ``jit(run_steps)``. Ratio sequential/vmapped per seed.
4. **one IMP round, lottojax vs eager PyTorch**: from the rewound ticket (θ0, all-ones
   mask, fresh Adam): train ``--imp-steps`` steps, prune 20% of each hidden layer's and 10%
   of the output layer's surviving weights by magnitude, rewind the survivors (and the
   biases) to θ0. lottojax: the jitted ``run_steps``, then one jitted program of
   ``magnitude``, ``prune_layerwise``, ``rewind`` and ``set_mask``. PyTorch (eager, CPU,
   ``torch.set_num_threads(--torch-threads)``): the same network loaded with the same θ0
   under ``torch.nn.utils.prune`` (``custom_from_mask``), a fresh ``torch.optim.Adam``,
   the same batches in the same order, ``prune.l1_unstructured`` per layer (scored on
   ``weight_orig``), rewinding through ``weight_orig``. Ratio PyTorch/lottojax per round;
   target >= 4. Checks: test accuracy after training, the trained weights and the new
   masks of both sides (same task, same work).

Prints the table and writes every figure (per-repeat seconds included) to
``<--out>/benchmarks/foundation.json``. Per case: the median per unit of work, the
fastest and slowest repeat, and "cores busy" (process CPU seconds per wall second: how
much of the machine the case used). Per comparison: the ratio of the medians, its range
over the interleaved repeats, the ratio of median CPU times (which moves less when other
processes share the cores), and the median of the per-repeat (paired) ratios with its
distribution-free 95% interval: the target counts as met or not met only when the whole
interval is on one side of it, and as undecided otherwise. On a busy machine, run with
more repeats; PyTorch's OpenMP threads spin-wait, so with other processes on the cores
``--torch-threads`` above 1 can make PyTorch many times slower.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lottojax as lj
from lottojax.data import Dataset, hold_out_validation, load
from lottojax.checkpoint import write_json
from lottojax.experiments.cli import parse_config
from lottojax.masks import PyTree
from lottojax.models import Model, create
from lottojax.train import Trainer, TrainState, make_trainer
from lottojax.timing import Comparison, format_table, interleaved

INPUT_SHAPE = (784,)
LAYERS = ("fc0", "fc1", "output")  # LeNet-300-100's kernels, in order
IMP_FRACTIONS = {"fc0": 0.2, "fc1": 0.2, "output": 0.1}  # the LTH per-round rates (a prefix of the params)


@dataclasses.dataclass(frozen=True)
class FoundationConfig:
    """Sizes of the four comparisons (the defaults finish in a few minutes on 2 cores)."""

    dataset: str = "fashion-mnist"  # or 'synthetic': MNIST-shaped inputs, labels from a random linear teacher
    synthetic_examples: int = 12000  # training examples of the synthetic set (+10% each for val and test)
    batch_size: int = 60
    learning_rate: float = 1.2e-3
    density: float = 0.2  # mask density of comparison 1
    step_steps: int = 200  # comparison 1: steps per timed call
    step_repeats: int = 151  # comparison 1: a ratio near 1 needs many short paired repeats to resolve 2%
    seeds: int = 8  # comparison 3
    seed_steps: int = 100  # comparison 3: steps per seed
    imp_steps: int = 1000  # comparison 4: training steps of the round
    repeats: int = 7
    warmup: int = 1
    torch: bool = True  # --no-torch skips comparison 4
    torch_threads: Optional[int] = None  # default: the cores this process may use (XLA's CPU thread pool size)


def synthetic_data(n_train: int, *, seed: int = 0) -> Dataset:
    """MNIST-shaped data with a learnable task: pixels uniform in [0, 1), labels the argmax
    of a fixed random linear map of the pixels (``n_train // 10`` validation and test).

    Examples:
      >>> d = synthetic_data(100)
      >>> d.x_train.shape, d.x_val.shape, d.x_test.shape, d.num_classes
      ((100, 784), (10, 784), (10, 784), 10)
    """
    rng = np.random.default_rng(seed)
    held = max(n_train // 10, 1)
    x = rng.random((n_train + 2 * held, *INPUT_SHAPE), dtype=np.float32)
    teacher = rng.normal(size=(INPUT_SHAPE[0], 10)).astype(np.float32)
    y = np.argmax((x - 0.5) @ teacher, axis=1)
    return hold_out_validation(x[:-held], y[:-held], x[-held:], y[-held:], validation=held, seed=seed)


def load_flat(config: FoundationConfig) -> Dataset:
    """The benchmark data with images flattened to 784 inputs, on the device."""
    if config.dataset == "synthetic":
        data = synthetic_data(config.synthetic_examples)
    elif config.dataset == "fashion-mnist":
        try:
            data = load("fashion-mnist")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}\nOr run the benchmarks on --dataset synthetic.") from err
    else:
        raise ValueError(f"dataset={config.dataset!r}: use 'fashion-mnist' or 'synthetic'")
    return jax.device_put(Dataset(*(a.reshape(len(a), -1) if a.ndim > 1 else a for a in data)))


def epoch_batches(key: jax.Array, n_train: int, batch_size: int, num_steps: int) -> np.ndarray:
    """The ``(num_steps, batch_size)`` example indices ``Trainer.run_steps(start=0)`` trains
    on with this key (epoch ``e``'s order is ``permutation(fold_in(key, e), n_train)``)."""
    per_epoch = n_train // batch_size
    epochs = -(-num_steps // per_epoch)
    orders = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n_train)) for e in range(epochs)]
    batches = np.concatenate([o[: per_epoch * batch_size].reshape(per_epoch, batch_size) for o in orders])
    return batches[:num_steps]


class Setup(NamedTuple):
    """What the comparisons share, each jitted function compiled once for all of them."""

    model: Model
    data: Dataset  # on the device
    key: jax.Array  # of every single-seed run (init, data order)
    theta0: PyTree
    model_state: PyTree
    mask: PyTree  # comparison 1's mask
    density: float  # its density
    trainer: Trainer  # Adam + masked_updates
    init: Callable  # jit(trainer.init)
    run: Callable  # jit(trainer.run_steps), num_steps static


def make_setup(config: FoundationConfig) -> Setup:
    if not 0.0 < config.density <= 1.0:
        raise ValueError(f"density={config.density} must be in (0, 1]")
    data = load_flat(config)
    model = create("lenet300100", input_shape=INPUT_SHAPE, num_classes=data.num_classes)
    key = jax.random.key(0)
    optimizer = optax.chain(optax.adam(config.learning_rate), lj.masked_updates())
    trainer = make_trainer(model, optimizer, batch_size=config.batch_size, eval_every=1)
    init = jax.jit(trainer.init)  # compiled once (initialisers compile slowly on CPU): every state comes from it
    dense = init(key, lj.ones_like(jax.eval_shape(model.init, key)[0]))

    @jax.jit
    def prune(params):
        mask = lj.prune_layerwise(lj.magnitude(params), lj.ones_like(params), 1.0 - config.density)
        return mask, lj.density(mask)

    mask, density = prune(dense.params)
    run = jax.jit(trainer.run_steps, static_argnames="num_steps")
    return Setup(model, data, key, dense.params, dense.model_state, mask, float(density), trainer, init, run)


def masked_vs_dense(config: FoundationConfig, setup: Setup) -> Comparison:
    data, key = setup.data, setup.key
    dense_optimizer = optax.adam(config.learning_rate)
    dense_trainer = make_trainer(setup.model, dense_optimizer, batch_size=config.batch_size, eval_every=1)
    dense_run = jax.jit(dense_trainer.run_steps, static_argnames="num_steps")
    dense_state = TrainState(setup.theta0, setup.model_state, dense_optimizer.init(setup.theta0), jnp.zeros((), jnp.int32))
    masked_state = setup.init(key, setup.mask)
    timings = interleaved(
        {
            "dense: optax.adam": lambda: dense_run(dense_state, data, key, 0, num_steps=config.step_steps),
            f"masked {setup.density:.0%}: adam + masked_updates": lambda: setup.run(
                masked_state, data, key, 0, num_steps=config.step_steps),
        },
        repeats=config.step_repeats, warmup=config.warmup,
    )
    dense_label, masked_label = timings
    return Comparison(
        f"1 masked vs dense step ({config.step_steps} steps per call)", "step", config.step_steps, timings,
        masked_label, dense_label, "masked/dense", ("<=", 1.02),
    )


def scan_vs_loop(config: FoundationConfig, setup: Setup) -> Comparison:
    data, key = setup.data, setup.key
    n_train = data.x_train.shape[0]
    steps = n_train // config.batch_size
    state = setup.init(key, setup.mask)
    step = jax.jit(setup.trainer.step)
    batches = epoch_batches(key, n_train, config.batch_size, steps)

    def python_loop():
        current, losses = state, []
        for idx in batches:
            current, loss = step(current, data.x_train[idx], data.y_train[idx])
            losses.append(loss)
        return current, losses

    timings = interleaved(
        {"scanned epoch: jit(run_steps)": lambda: setup.run(state, data, key, 0, num_steps=steps),
         "Python loop of jit(step)": python_loop},
        repeats=config.repeats, warmup=config.warmup,
    )
    scan_losses = np.asarray(setup.run(state, data, key, 0, num_steps=steps)[1])
    loop_losses = np.asarray(jnp.stack(python_loop()[1]))
    scan_label, loop_label = timings
    return Comparison(
        f"2 scanned epoch vs Python loop ({steps} steps)", "epoch", 1, timings, loop_label, scan_label, "loop/scan",
        checks={"max |loss difference| over the epoch": float(np.max(np.abs(scan_losses - loop_losses)))},
    )


def vmapped_vs_sequential(config: FoundationConfig, setup: Setup) -> Comparison:
    data, num_steps = setup.data, config.seed_steps
    keys = jax.vmap(jax.random.key)(jnp.arange(config.seeds, dtype=jnp.uint32))
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *(setup.init(k, setup.mask) for k in keys))
    vmapped = jax.jit(jax.vmap(partial(setup.trainer.run_steps, num_steps=num_steps), in_axes=(0, None, 0, None)))
    per_seed = [(jax.tree.map(lambda x: x[i], states), keys[i]) for i in range(config.seeds)]

    def sequential():
        return [setup.run(s, data, k, 0, num_steps=num_steps) for s, k in per_seed]

    timings = interleaved(
        {f"{config.seeds} seeds: jit(vmap(run_steps))": lambda: vmapped(states, data, keys, 0),
         f"{config.seeds} seeds one after another": sequential},
        repeats=config.repeats, warmup=config.warmup,
    )
    vmapped_losses = np.asarray(vmapped(states, data, keys, 0)[1])
    sequential_losses = np.stack([np.asarray(losses) for _, losses in sequential()])
    vmapped_label, sequential_label = timings
    return Comparison(
        f"3 {config.seeds} seeds vmapped vs sequential ({num_steps} steps each)", "seed", config.seeds, timings,
        sequential_label, vmapped_label, "sequential/vmapped",
        checks={"max |loss difference| vmapped vs per seed": float(np.max(np.abs(vmapped_losses - sequential_losses)))},
    )


def lottojax_imp_round(setup: Setup, num_steps: int):
    """One IMP round in lottojax as a function of (rewound ticket, θ0): the jitted
    ``run_steps`` (shared with the other comparisons), then one jitted program that prunes
    by magnitude and rewinds. Returns the trained params, the new mask and the next ticket."""

    @jax.jit
    def prune_and_rewind(trained: TrainState, ticket: TrainState, theta0: PyTree):
        new_mask = lj.prune_layerwise(lj.magnitude(trained.params), lj.get_mask(trained.opt_state), IMP_FRACTIONS)
        next_ticket = ticket._replace(params=lj.rewind(trained.params, theta0, new_mask),
                                      opt_state=lj.set_mask(ticket.opt_state, new_mask))
        return new_mask, next_ticket

    def imp_round(ticket: TrainState, theta0: PyTree):
        trained, _ = setup.run(ticket, setup.data, setup.key, 0, num_steps=num_steps)
        return (trained.params, *prune_and_rewind(trained, ticket, theta0))

    return imp_round


def torch_lenet(torch, params, mask):
    """LeNet-300-100 in PyTorch holding the JAX ``params`` (kernels transposed) under
    ``torch.nn.utils.prune`` with ``mask``."""
    from torch.nn.utils import prune

    class LeNet300100(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1, self.output = (torch.nn.Linear(*params[name]["kernel"].shape) for name in LAYERS)

        def forward(self, x):
            x = torch.relu(self.fc0(x))
            return self.output(torch.relu(self.fc1(x)))

    net = LeNet300100()
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(net, name)
            layer.weight.copy_(torch.from_numpy(np.array(params[name]["kernel"]).T))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
            prune.custom_from_mask(layer, "weight", torch.from_numpy(np.asarray(mask[name]["kernel"]).T.copy()))
    return net


def torch_imp_round(torch, net, theta0, x_train, y_train, batches, learning_rate: float):
    """The same round in eager PyTorch; returns the trained (masked) weights and biases."""
    from torch.nn.utils import prune

    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    for idx in batches:
        loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layers = [getattr(net, name) for name in LAYERS]
    # layer.weight is recomputed from weight_orig * weight_mask only in the next forward pass
    trained = [(layer.weight_orig.detach() * layer.weight_mask, layer.bias.detach().clone()) for layer in layers]
    with torch.no_grad():
        for name, layer in zip(LAYERS, layers):
            # scores from weight_orig: prune reads `layer.weight`, which still holds the
            # weights from before the last optimizer step (it is refreshed by a forward pass)
            prune.l1_unstructured(layer, "weight", amount=IMP_FRACTIONS[name], importance_scores=layer.weight_orig)
            layer.weight_orig.copy_(theta0[name][0])
            layer.bias.copy_(theta0[name][1])
    return trained


def torch_accuracy(torch, trained, x, y) -> float:
    with torch.no_grad():
        h = x
        for i, (w, b) in enumerate(trained):
            h = torch.nn.functional.linear(h, w, b)
            h = torch.relu(h) if i < len(trained) - 1 else h
        return float((h.argmax(1) == y).float().mean())


def lottojax_vs_torch(config: FoundationConfig, setup: Setup, torch) -> Comparison:
    data, key, theta0 = setup.data, setup.key, setup.theta0
    threads = config.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    ticket = setup.init(key, lj.ones_like(theta0))  # round 1: the dense network at θ0
    imp_round = lottojax_imp_round(setup, config.imp_steps)

    host = jax.device_get(data)
    as_torch = lambda tree: jax.tree.map(lambda a: torch.from_numpy(np.array(a)), tree)  # writable copies
    x_train, y_train, x_test, y_test = as_torch((host.x_train, host.y_train.astype(np.int64),
                                                 host.x_test, host.y_test.astype(np.int64)))
    batches = as_torch(epoch_batches(key, len(host.x_train), config.batch_size, config.imp_steps).astype(np.int64))
    theta0_torch = {name: as_torch((theta0[name]["kernel"].T, theta0[name]["bias"])) for name in LAYERS}
    torch_runs = []

    def torch_round(net):
        trained = torch_imp_round(torch, net, theta0_torch, x_train, y_train, batches, config.learning_rate)
        torch_runs.append((net, trained))

    torch_label = f"eager PyTorch, {threads} thread{'s' * (threads > 1)}"
    timings = interleaved(
        {"lottojax: jitted run_steps, prune, rewind": lambda: imp_round(ticket, theta0), torch_label: torch_round},
        setups={torch_label: lambda: (torch_lenet(torch, theta0, lj.ones_like(theta0)),)},
        repeats=config.repeats, warmup=config.warmup,
    )
    trained, new_mask, _ = imp_round(ticket, theta0)
    jax_accuracy = float(jax.jit(setup.trainer.evaluate)(trained, setup.model_state, data.x_test, data.y_test).accuracy)
    net, torch_trained = torch_runs[-1]
    jax_kernels = {name: np.asarray(new_mask[name]["kernel"]) for name in LAYERS}
    torch_kernels = {name: getattr(net, name).weight_mask.numpy().T.astype(bool) for name in LAYERS}
    total = sum(m.size for m in jax_kernels.values())
    agree = sum(int((jax_kernels[n] == torch_kernels[n]).sum()) for n in LAYERS) / total
    kept = lambda masks: sum(int(m.sum()) for m in masks.values()) / total
    gaps = np.concatenate([np.abs(np.asarray(trained[name]["kernel"]).T - w.numpy()).ravel()
                           for name, (w, _) in zip(LAYERS, torch_trained)])
    weight_gap = (float(np.median(gaps)), float(np.max(gaps)))
    jax_label = next(iter(timings))
    return Comparison(
        f"4 one IMP round ({config.imp_steps} steps, prune, rewind)", "round", 1, timings, torch_label, jax_label,
        "PyTorch/lottojax", (">=", 4.0),
        checks={
            "test accuracy after training (lottojax, PyTorch)":
                (jax_accuracy, torch_accuracy(torch, torch_trained, x_test, y_test)),
            "kernel density after pruning (lottojax, PyTorch)": (kept(jax_kernels), kept(torch_kernels)),
            "|trained weight difference| (median, max)": weight_gap,
            "fraction of new-mask entries where both agree": agree,
            "torch.set_num_threads": threads,
        },
    )


def import_torch(wanted: bool):
    """``(torch, None)``, or ``(None, why the PyTorch comparison is skipped)``."""
    if not wanted:
        return None, "skipped (--no-torch)"
    try:
        import torch
    except ImportError:
        return None, 'skipped: PyTorch is not installed; pip install -e ".[torch]" to run it'
    return torch, None


def run_foundation(config: FoundationConfig) -> tuple[list[Comparison], dict]:
    """Runs the comparisons; returns them and a JSON-ready record of every figure."""
    load_before = os.getloadavg()
    setup = make_setup(config)
    comparisons = [masked_vs_dense(config, setup), scan_vs_loop(config, setup), vmapped_vs_sequential(config, setup)]
    torch, skipped = import_torch(config.torch)
    if torch is not None:
        comparisons.append(lottojax_vs_torch(config, setup, torch))
    record = dict(
        config=dataclasses.asdict(config),
        data=dict(name=config.dataset, n_train=int(setup.data.x_train.shape[0]),
                  n_test=int(setup.data.x_test.shape[0])),
        machine=dict(platform=platform.platform(), python=platform.python_version(), jax=jax.__version__,
                     torch=None if torch is None else torch.__version__,
                     devices=[str(d) for d in jax.devices()], cpus_usable=len(os.sched_getaffinity(0)),
                     load_average_before=load_before, load_average_after=os.getloadavg()),
        comparisons=[c.as_dict() for c in comparisons],
        torch_comparison=skipped or "run",
    )
    return comparisons, record


def main(argv=None) -> dict:
    config, out = parse_config(FoundationConfig, argv, description=__doc__)
    comparisons, record = run_foundation(config)
    print(f"LeNet-300-100, Adam {config.learning_rate:g}, batch {config.batch_size}, {config.dataset} "
          f"({record['data']['n_train']} training examples); {record['machine']['devices']}, "
          f"load average {record['machine']['load_average_before'][0]:.1f} before, "
          f"{record['machine']['load_average_after'][0]:.1f} after\n")
    print(format_table(comparisons))
    if record["torch_comparison"] != "run":
        print(f"\n4 one IMP round, lottojax vs PyTorch: {record['torch_comparison']}")
    path = os.path.join(out, "benchmarks", "foundation.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, record)
    print(f"\nfigures in {path}")
    return record


if __name__ == "__main__":
    main()
