"""Instability and IMP with late rewinding, swept over the rewind step ``k`` (Frankle et al.).

:func:`run_stability` is what ``python experiments/stability.py`` runs; a notebook can call
it the same way. For each ``k`` in ``config.rewind_steps``, for all seeds at once:

1. IMP with global magnitude pruning rewound to ``θ_k`` (:func:`lottojax.imp.run_imp`)
   down to ``(1 - prune_rate) ** rounds`` of the prunable weights, with the random
   reinitialisation and random pruning (shuffled mask) controls at every level;
2. the instability of the dense network at ``θ_k`` and of the IMP subnetwork
   ``m_k ⊙ θ_k``: two copies of each trained from step ``k`` to ``num_steps`` with the
   same two data orders, and the test error along the segment between them
   (:func:`lottojax.stability.instability`, BatchNorm statistics recomputed at each
   point). Both networks of all seeds, both copies each, train in one vmapped program.
   ``θ_k`` is IMP's rewind point; the copies' data orders come from the ``copies``
   key stream (:data:`lottojax.seeds.KEY_STREAMS`), which IMP does not use.

It writes into ``<root>/stability-<config hash>/``: ``config.json``, ``results.json``
(per ``k``: mean, std and per-seed values), ``results.npz`` (every array, the curves
along the path included), ``stability.png`` and ``checkpoint/`` plus ``imp-k<k>/``
(a killed run resumes at the last finished ``k``, and inside it at the last IMP level).
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.experiment import load_dataset, make_optimizer, run_directory, write_json
from lottojax.checkpoint import Checkpointer
from lottojax.imp import CONTROLS, run_imp
from lottojax.seeds import seed_keys
from lottojax.masks import ones_like
from lottojax.stability import instability, recompute_batch_stats

#: ``config.widths`` is passed to the model under this keyword.
WIDTH_ARGUMENT = {"mlp": "hidden", "lenet300100": "hidden", "cnn1d": "channels", "conv2": "conv_widths",
                  "conv4": "conv_widths", "conv6": "conv_widths"}


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    """Everything that defines a run; the defaults are the MNIST-1D MLP with Adam.

    The MLP 40-300-100-10 is the LeNet-300-100 of Frankle & Carbin scaled to MNIST-1D
    (Adam 1.2e-3, batch 60), trained 1500 steps (26 epochs). IMP prunes 53% of the
    surviving weights per round globally (Frankle et al. prune 20%); 4 rounds reach
    ``0.47 ** 4 = 4.9%`` density at a fifth of the cost of 14 rounds at 20%.
    """

    model: str = "mlp"
    widths: tuple[int, ...] = (300, 100)  # hidden sizes (mlp), channels (cnn1d), conv widths (conv*)
    dataset: str = "mnist1d"
    data_dir: Optional[str] = None
    validation: Optional[int] = None  # None: the loader's default (500 for MNIST-1D)
    optimizer: str = "adam"
    learning_rate: float = 1.2e-3
    lr_drops: tuple[float, ...] = ()  # fractions of num_steps where the learning rate is multiplied by 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 60
    num_steps: int = 1500
    eval_every: int = 100
    rewind_steps: tuple[int, ...] = (0, 5, 25)
    seeds: int = 5
    num_points: int = 30
    rounds: int = 4
    prune_rate: float = 0.53  # global, per round
    prune_output: bool = True  # False: the output layer stays dense (OpenLTH's ResNet/VGG setting)
    controls: tuple[str, ...] = CONTROLS
    stats_batches: int = 16  # BatchNorm statistics at each point: this many training batches


@dataclasses.dataclass(frozen=True)
class CNN1DStabilityConfig(StabilityConfig):
    """The BatchNorm net: CNN1D with 32 channels per convolution, SGD with momentum 0.9 at
    learning rate 0.2, divided by 10 at 50% and 75% of training (the shape of the ResNet-20
    schedule of Frankle et al.), batch 128, 800 steps (29 epochs); its output layer is not
    pruned, so the density is that of the convolutions.

    The schedule counts the optimizer's own steps, so the copies and the IMP ticket,
    which start from ``θ_k``'s optimizer state, follow it exactly; the random-reinit
    control starts a fresh optimizer at step ``k``, so its drops come ``k`` steps later.
    """

    model: str = "cnn1d"
    widths: tuple[int, ...] = (32, 32, 32)
    optimizer: str = "momentum"
    learning_rate: float = 0.2
    lr_drops: tuple[float, ...] = (0.5, 0.75)
    batch_size: int = 128
    num_steps: int = 800
    prune_output: bool = False


#: ``--net`` name -> config class whose defaults are that net's setting.
PRESETS = {"mlp": StabilityConfig, "cnn1d": CNN1DStabilityConfig}


class StabilityResult(NamedTuple):
    """Per rewind step ``k`` and seed, as numpy arrays (percentages are fractions here).

    Attributes:
      rewind_steps: ``(K,)`` the ``k`` values.
      seeds: the seeds.
      arms: IMP arms, ``('ticket', 'reinit', 'shuffle')``.
      alpha: ``(P,)`` interpolation weights.
      dense_error, dense_loss: ``(K, S, P)`` test error / loss along the path between the
        two copies of the dense network trained from ``θ_k``.
      dense_barrier: ``(K, S)`` its error barrier.
      sparse_error, sparse_loss, sparse_barrier: the same for the IMP subnetwork ``m_k ⊙ θ_k``.
      density: ``(K, S)`` density of the IMP subnetwork (prunable weights).
      imp_accuracy: ``(K, S, A)`` final test accuracy of each arm at that density.
      imp_early_stop_accuracy: ``(K, S, A)`` test accuracy at the early-stop step.
      dense_accuracy: ``(K, S)`` final test accuracy of the dense network (IMP level 0).
      level_density: ``(K, L, S)`` density at every IMP level.
      level_accuracy: ``(K, L, S, A)`` final test accuracy at every IMP level.
      seconds: ``(K,)`` wall time per ``k`` (compilation included).
    """

    rewind_steps: np.ndarray
    seeds: np.ndarray
    arms: tuple[str, ...]
    alpha: np.ndarray
    dense_error: np.ndarray
    dense_loss: np.ndarray
    dense_barrier: np.ndarray
    sparse_error: np.ndarray
    sparse_loss: np.ndarray
    sparse_barrier: np.ndarray
    density: np.ndarray
    imp_accuracy: np.ndarray
    imp_early_stop_accuracy: np.ndarray
    dense_accuracy: np.ndarray
    level_density: np.ndarray
    level_accuracy: np.ndarray
    seconds: np.ndarray


def _check(config: StabilityConfig) -> None:
    bad = [k for k in config.rewind_steps if not 0 <= k < config.num_steps]
    if bad or not config.rewind_steps or len(set(config.rewind_steps)) != len(config.rewind_steps):
        raise ValueError(f"rewind_steps={config.rewind_steps} must be distinct steps in [0, num_steps={config.num_steps})")
    if config.widths and config.model not in WIDTH_ARGUMENT:
        raise ValueError(f"widths={config.widths} is not supported for model={config.model!r}; pass --widths "
                         f"with no value (the model's defaults) or use one of {sorted(WIDTH_ARGUMENT)}")
    if any(not 0 < f < 1 for f in config.lr_drops) or len(set(config.lr_drops)) != len(config.lr_drops):
        raise ValueError(f"lr_drops={config.lr_drops} must be distinct fractions of training in (0, 1)")
    if config.seeds < 1 or config.rounds < 1 or config.stats_batches < 1:
        raise ValueError(f"seeds={config.seeds}, rounds={config.rounds} and stats_batches={config.stats_batches} "
                         "must be positive")


def _model(config: StabilityConfig, data):
    from lottojax.models import create

    kwargs = {WIDTH_ARGUMENT[config.model]: tuple(config.widths)} if config.widths else {}
    return create(config.model, input_shape=data.input_shape, num_classes=data.num_classes, **kwargs)


def _learning_rate(config: StabilityConfig):
    """A float, or a step schedule dividing by 10 at each of ``config.lr_drops``.

    Examples:
      >>> schedule = _learning_rate(StabilityConfig(learning_rate=0.2, lr_drops=(0.5, 0.75), num_steps=800))
      >>> [round(float(schedule(step)), 4) for step in (0, 399, 400, 599, 600)]
      [0.2, 0.2, 0.02, 0.02, 0.002]
    """
    if not config.lr_drops:
        return config.learning_rate
    import optax

    boundaries = {int(round(f * config.num_steps)): 0.1 for f in config.lr_drops}
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def _prunable(config: StabilityConfig):
    if config.prune_output:
        return None
    return lambda path, leaf: jnp.ndim(leaf) >= 2 and not path.startswith("output")


def _recompute(model, data, config: StabilityConfig):
    """``recompute_batch_stats`` on the first ``stats_batches`` training batches, or None
    for a model without floating-point state."""
    _, state = jax.eval_shape(model.init, jax.random.key(0))
    if not any(jnp.issubdtype(s.dtype, jnp.floating) for s in jax.tree.leaves(state)):
        return None
    count = config.stats_batches * config.batch_size
    if count > len(data.x_train):
        raise ValueError(f"stats_batches * batch_size = {count} exceeds the {len(data.x_train)} training examples")
    batches = data.x_train[:count].reshape(config.stats_batches, config.batch_size, *data.input_shape)
    return partial(recompute_batch_stats, model, batches=jnp.asarray(batches))


def _instability_program(trainer, *, start: int, num_steps: int, num_points: int, recompute):
    """Jitted ``(θ_k (S,), copy keys (S,), masks (S, 2), data) -> LinearPath (S, 2, ...)``:
    the dense and the sparse network of every seed, two copies each, in one vmap."""

    def one(state, key, mask, data):
        return instability(trainer, state, data, key=key, start=start, num_steps=num_steps, mask=mask,
                           num_points=num_points, recompute_stats=recompute)[0]

    per_seed = jax.vmap(one, in_axes=(None, None, 0, None))
    return jax.jit(jax.vmap(per_seed, in_axes=(0, 0, 0, None)))


def _states_at(trainer, data, seeds, k: int):
    init_keys, data_keys = seed_keys(seeds, "init"), seed_keys(seeds, "data")
    state = jax.jit(jax.vmap(lambda key: trainer.init(key)))(init_keys)
    if k == 0:
        return state
    to_k = jax.jit(jax.vmap(partial(trainer.run_steps, start=0, num_steps=k), in_axes=(0, None, 0)))
    return to_k(state, data, data_keys)[0]


def _one_rewind_step(config, trainer, model, data, k: int, workdir: str, progress: bool) -> dict:
    seeds = tuple(range(config.seeds))
    imp = run_imp(trainer, data, seeds=seeds, rounds=config.rounds, fraction=config.prune_rate,
                  num_steps=config.num_steps, scope="global", rewind_step=k, controls=config.controls,
                  prunable=_prunable(config), checkpoint_dir=os.path.join(workdir, f"imp-k{k}"), progress=progress)
    theta_k = _states_at(trainer, data, seeds, k)
    masks = jax.tree.map(lambda dense, ticket: jnp.stack([dense, jnp.asarray(ticket)], axis=1),
                         jax.vmap(ones_like)(theta_k.params), imp.masks[-1])
    copy_keys = seed_keys(seeds, "copies")
    program = _instability_program(trainer, start=k, num_steps=config.num_steps - k, num_points=config.num_points,
                                   recompute=_recompute(model, data, config))
    path = jax.device_get(program(theta_k, copy_keys, masks, data))
    return dict(
        alpha=np.asarray(path.alpha[0, 0]),
        dense_error=path.error[:, 0], dense_loss=path.loss[:, 0], dense_barrier=path.barrier[:, 0],
        sparse_error=path.error[:, 1], sparse_loss=path.loss[:, 1], sparse_barrier=path.barrier[:, 1],
        density=imp.density[-1], imp_accuracy=imp.final_accuracy[-1],
        imp_early_stop_accuracy=imp.early_stop_accuracy[-1], dense_accuracy=imp.final_accuracy[0, :, 0],
        level_density=imp.density, level_accuracy=imp.final_accuracy,
    )


def run_stability(config: StabilityConfig, root: str = "runs", *, progress: bool = True) -> tuple[StabilityResult, str]:
    """Runs (or resumes) the sweep over ``config.rewind_steps``; returns the result and the
    run directory."""
    from lottojax.train import make_trainer

    _check(config)
    workdir = run_directory(root, "stability", config)
    data = jax.device_put(load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation))
    model = _model(config, data)
    optimizer = make_optimizer(config.optimizer, _learning_rate(config), momentum=config.momentum,
                               weight_decay=config.weight_decay)
    trainer = make_trainer(model, optimizer, batch_size=config.batch_size, eval_every=config.eval_every)

    ks = list(config.rewind_steps)
    checkpoint = Checkpointer(os.path.join(workdir, "checkpoint"), dataclasses.asdict(config))
    carry = _load(checkpoint)
    for i, k in enumerate(ks):
        if carry is not None and i < int(carry["done"]):
            continue
        started = time.time()
        record = _one_rewind_step(config, trainer, model, data, k, workdir, progress)
        record["seconds"] = np.float64(time.time() - started)
        if carry is None:
            carry = {"done": np.array(0, np.int32),
                     "results": {name: np.zeros((len(ks), *np.shape(v)), np.asarray(v).dtype) for name, v in record.items()}}
        for name, value in record.items():
            carry["results"][name][i] = value
        carry["done"] = np.array(i + 1, np.int32)
        checkpoint.save(i + 1, carry)
        if progress:
            table = stability_table(_as_result(carry, config, i + 1)).splitlines()
            print(f"k={k} done in {record['seconds']:.0f} s\n{table[0]}\n{table[-1]}", flush=True)
    result = _as_result(carry, config, len(ks))
    _write(result, config, workdir)
    return result, workdir


def _load(checkpoint: Checkpointer) -> Optional[dict]:
    """The saved sweep (numpy arrays), or None before the first ``k`` is done."""
    return checkpoint.restore()[1]


def _as_result(carry: dict, config: StabilityConfig, done: int) -> StabilityResult:
    r = {name: np.asarray(v)[:done] for name, v in carry["results"].items()}
    r["alpha"] = r["alpha"][0]
    return StabilityResult(rewind_steps=np.asarray(config.rewind_steps[:done]), seeds=np.arange(config.seeds),
                           arms=("ticket", *config.controls), **r)


def _mean_std(values: np.ndarray) -> str:
    return f"{100 * values.mean():6.2f} ± {100 * values.std():5.2f}"


def stability_table(result: StabilityResult) -> str:
    """Per ``k`` (percent, mean ± std over seeds): error barrier of the dense network and of
    the IMP subnetwork, the subnetwork's density, the final test accuracy of each IMP arm
    at that density, and of the dense network.

    Examples:
      >>> z = np.zeros((1, 2, 3)); b = np.array([[0.1, 0.2]]); a = np.full((1, 2, 1), 0.9)
      >>> r = StabilityResult(np.array([0]), np.arange(2), ('ticket',), np.linspace(0, 1, 3), z, z, b, z, z,
      ...                     b / 2, np.full((1, 2), .05), a, a, np.full((1, 2), .95), z, z, np.zeros(1))
      >>> print(stability_table(r))
          k | dense barrier  | subnet barrier | density | ticket acc     | dense acc
          0 |  15.00 ±  5.00 |   7.50 ±  2.50 |   5.00% |  90.00 ±  0.00 |  95.00 ±  0.00
    """
    header = ["    k", "dense barrier ", "subnet barrier", "density"] + [f"{arm} acc".ljust(14) for arm in result.arms]
    lines = [" | ".join(header + ["dense acc"])]
    for i, k in enumerate(result.rewind_steps):
        cells = [f"{k:>5}", _mean_std(result.dense_barrier[i]), _mean_std(result.sparse_barrier[i]),
                 f"{100 * result.density[i].mean():6.2f}%"]
        cells += [_mean_std(result.imp_accuracy[i, :, a]) for a in range(len(result.arms))]
        lines.append(" | ".join(cells + [_mean_std(result.dense_accuracy[i])]))
    return "\n".join(lines)


def stability_summary(result: StabilityResult) -> list[dict]:
    """One JSON-ready dict per ``k``: mean, std and per-seed values of every measurement."""

    def stats(values):
        return {"mean": float(values.mean()), "std": float(values.std()), "per_seed": values.tolist()}

    rows = []
    for i, k in enumerate(result.rewind_steps):
        row = {"rewind_step": int(k), "seconds": float(result.seconds[i])}
        for name in ("dense_barrier", "sparse_barrier", "density", "dense_accuracy"):
            row[name] = stats(getattr(result, name)[i])
        for name in ("imp_accuracy", "imp_early_stop_accuracy"):
            row[name] = {arm: stats(getattr(result, name)[i, :, a]) for a, arm in enumerate(result.arms)}
        rows.append(row)
    return rows


def plot_stability(result: StabilityResult, path: str, *, title: str = "") -> None:
    """Saves six panels (mean ± std over seeds): test error along the path for each ``k``
    (dense; IMP subnetwork), error barrier vs ``k``, accuracy at the final density vs
    ``k`` for each IMP arm against the dense network, and accuracy vs density at every IMP
    level for each ``k`` (the ticket; the controls)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4))
    axes = axes.ravel()
    ks = np.asarray(result.rewind_steps)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, errors, name in ((axes[0], result.dense_error, "dense"), (axes[1], result.sparse_error, "IMP subnetwork")):
        for i, k in enumerate(ks):
            mean, std = 100 * errors[i].mean(0), 100 * errors[i].std(0)
            ax.plot(result.alpha, mean, color=colors[i % len(colors)], label=f"k = {k}")
            ax.fill_between(result.alpha, mean - std, mean + std, color=colors[i % len(colors)], alpha=0.15)
        ax.set_xlabel("interpolation α")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{name}: error along the path")
    for barrier, name in ((result.dense_barrier, "dense"), (result.sparse_barrier, "IMP subnetwork")):
        axes[2].errorbar(ks, 100 * barrier.mean(1), yerr=100 * barrier.std(1), marker="o", capsize=3, label=name)
    axes[2].axhline(2, color="gray", linestyle="--", linewidth=1, label="2% (stable below)")
    axes[2].set_ylabel("error barrier (%)")
    axes[2].set_title("instability vs rewind step")
    for a, arm in enumerate(result.arms):
        acc = 100 * result.imp_accuracy[:, :, a]
        axes[3].errorbar(ks, acc.mean(1), yerr=acc.std(1), marker="o", capsize=3, label=arm)
    dense = 100 * result.dense_accuracy
    axes[3].errorbar(ks, dense.mean(1), yerr=dense.std(1), color="black", linestyle="--", capsize=3, label="dense")
    axes[3].set_ylabel("final test accuracy (%)")
    axes[3].set_title(f"IMP at {100 * result.density.mean():.1f}% density vs rewind step")
    for ax in axes[2:4]:
        ax.set_xscale("symlog", linthresh=max(1, int(ks[ks > 0].min())) if (ks > 0).any() else 1)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("rewind step k")
    styles = {"ticket": "-", "reinit": "--", "shuffle": ":"}
    for ax, arms in ((axes[4], ("ticket",)), (axes[5], result.arms[1:])):
        for i, k in enumerate(ks):
            for arm in arms:
                acc = 100 * result.level_accuracy[i, :, :, result.arms.index(arm)]
                ax.errorbar(100 * result.level_density[i].mean(1), acc.mean(1), yerr=acc.std(1), capsize=2,
                            marker="o", markersize=3, color=colors[i % len(colors)], linestyle=styles.get(arm, "-"),
                            label=f"{arm}, k = {k}")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title("IMP " + " and ".join(arms) + " at every level")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(result: StabilityResult, config: StabilityConfig, workdir: str) -> None:
    write_json(os.path.join(workdir, "results.json"),
               {"config": dataclasses.asdict(config), "rewind_steps": stability_summary(result)})
    arrays = {k: v for k, v in result._asdict().items() if isinstance(v, np.ndarray)}
    np.savez(os.path.join(workdir, "results.npz"), arms=np.array(result.arms), **arrays)
    plot_stability(result, os.path.join(workdir, "stability.png"),
                   title=f"Linear mode connectivity on {config.dataset} ({config.model}, {config.optimizer} "
                         f"lr {config.learning_rate}, {config.num_steps} steps), {config.seeds} seeds")
