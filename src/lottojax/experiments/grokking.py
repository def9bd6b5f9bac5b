"""Grokking tickets (Minegishi et al.; PAPERS.md §6) from one config.

:func:`run_grokking` is what ``python experiments/grokking.py`` runs; a notebook can call it
the same way. On ``(a + b) mod 67`` (unordered pairs ``a <= b``, 40% of them for training,
full batch; :func:`lottojax.data.modular.modular_arithmetic`) with the bias-free embedding
MLP (:class:`lottojax.models.GrokMLP`, 115,000 weights) and AdamW (lr 1e-3, betas (0.9,
0.98), weight decay 1), for every seed (``seed_strategy`` over ``devices``):

1. ``dense`` trains from θ0 for ``num_steps`` full-batch steps (one compiled scan per
   seed), evaluating train and test accuracy every ``eval_every`` steps, and keeps the
   weights of two checkpoints: *memorisation*, the first evaluation with training accuracy
   at or above ``memorisation_threshold``, and *transition*, the first with test accuracy at
   or above ``transition_threshold``. The *grokking ticket* is the global magnitude mask of
   the final (grokked) weights over all four matrices, keeping ``density`` (40%);
2. every other arm of ``arms`` (the registry :data:`ARMS`) trains as long from the same
   θ0 with the same data (the seed's ``init``, ``data`` and ``mask`` key streams):

   - ``ticket``: the grokking ticket, rewound to θ0 (pruned weights stay exactly 0:
     the optimizer's mask zeroes their updates, decoupled decay included);
   - ``ticket-no-wd``: the same, trained without weight decay;
   - ``random``, ``snip``, ``grasp``, ``synflow``: masks of the same size from those
     pruning methods *at initialisation* (:data:`lottojax.methods.METHODS`; SNIP on
     ``snip_batch`` training pairs, GraSP on ``grasp_per_class`` pairs per class at
     temperature ``grasp_temperature`` — a class with fewer training pairs repeats them —,
     SynFlow with ``synflow_rounds`` rounds on the all-ones one-hot input);
   - ``equal-norm``: dense θ0 scaled to the L2 norm of the ticket θ0 ⊙ m
     (:func:`lottojax.grokking.scale_to_norm`, ``mode='global'``);
     ``equal-norm-reference``: scaled by the reference code's ratio of sums of per-matrix
     norms (``mode='per_matrix'``);
   - ``memorisation``, ``transition``: global magnitude masks (``density``) of the dense
     run's weights at those checkpoints, rewound to θ0;

3. reports, per arm, the steps to ``threshold`` (95%) test accuracy — mean ± std over the
   seeds that got there, and how many never did within ``num_steps`` — and writes into
   ``<root>/grokking-<config hash>/``: ``config.json``, ``results.json`` (per arm: steps
   per seed, final accuracies, density, mean/min/max curves), ``results.npz`` (every
   curve), ``grokking.png`` (test and train accuracy vs step per arm) and
   ``arms/<arm>.npz`` once an arm is trained, so a killed run resumes at the next arm.

Departures from the reference code: the loss is computed in float32 with
:func:`lottojax.grokking.precise_cross_entropy` (the reference casts the logits to float64;
both stay accurate as the loss nears 0, where the plain float32 loss rounds to 0 and
grokking then follows rounding noise: ``loss='float32'`` shows it); the dense MLP is evaluated with its linear products re-associated (the same
function, see :class:`~lottojax.models.GrokMLP`); the PaI controls score θ0 (the reference
scores the trained weights unless told otherwise); the split is one permutation of the
pairs by ``data_seed`` (NumPy's, not Python's ``random.shuffle``), the same for every seed.
"""
from __future__ import annotations

import dataclasses
import os
import time
from types import MappingProxyType
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottojax.checkpoint import load_arrays, save_arrays
from lottojax.data.modular import OPS, modular_arithmetic
from lottojax.experiments.base import (
    ConfigError,
    over_seeds,
    stream_keys,
    ExperimentConfig,
    check_fields,
    learning_rate_schedule,
    make_optimizer,
    option,
    override,
)
from lottojax.experiments.metrics import log_history
from lottojax.experiments.plots import figure, plural, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, open_run, stats, write_results
from lottojax.grokking import NEVER, params_norm, precise_cross_entropy, scale_to_norm, steps_to_threshold, train_curves
from lottojax.masks import PyTree, apply_mask, ones_like
from lottojax.methods import ScoreContext, get_method, prune_with
from lottojax.optim import masked_updates
from lottojax.seeds import gather, put_seeded
from lottojax.train import cross_entropy, make_trainer

MODELS = ("grok-mlp", "grok-transformer")
LOSSES = ("precise", "float32")


class Arm(NamedTuple):
    """How one arm starts and trains.

    Attributes:
      mask: ``None`` (dense); ``'ticket'``, ``'memorisation'`` or ``'transition'`` (the
        global magnitude mask of the dense run's weights at the end / at that checkpoint);
        or a registered pruning method (:data:`lottojax.methods.METHODS`) applied to θ0.
      scale: ``None``, or a :func:`lottojax.grokking.scale_to_norm` mode: θ0 is scaled to the
        norm of the ticket θ0 ⊙ m in that mode.
      weight_decay: train with the config's weight decay (else none).
      label: what the table and the plot call it.
    """

    mask: Optional[str]
    scale: Optional[str] = None
    weight_decay: bool = True
    label: str = ""


#: The masks taken from the dense run (the others are pruning methods at initialisation).
DENSE_MASKS = ("ticket", "memorisation", "transition")

#: The arms, by name. A new control is one entry here (a pruning method added to
#: :data:`lottojax.methods.METHODS` is one ``Arm('<name>')``).
ARMS = MappingProxyType({
    "dense": Arm(None, label="dense"),
    "ticket": Arm("ticket", label="grokking ticket"),
    "ticket-no-wd": Arm("ticket", weight_decay=False, label="ticket, no weight decay"),
    "random": Arm("random", label="random mask"),
    "snip": Arm("snip", label="SNIP at init"),
    "grasp": Arm("grasp", label="GraSP at init"),
    "synflow": Arm("synflow", label="SynFlow at init"),
    "equal-norm": Arm(None, scale="global", label="dense, ticket's L2 norm"),
    "equal-norm-reference": Arm(None, scale="per_matrix", label="dense, ticket's norm (ref.)"),
    "memorisation": Arm("memorisation", label="mask at memorisation"),
    "transition": Arm("transition", label="mask at transition"),
})


@dataclasses.dataclass(frozen=True)
class GrokkingConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the setting of PAPERS.md §6.

    ``(a + b) mod 67`` on the 2278 unordered pairs, 911 for training, full batch; the MLP
    67-500-48-500-67 without biases; AdamW lr 1e-3, betas (0.9, 0.98), weight decay 1;
    40,000 steps (the paper's dense run groks at about 20K; its random mask had not within
    30K), evaluated every 100; tickets keep 40% of the weights; 5 seeds.
    """

    model: str = option("grok-mlp", "grok-mlp (the paper's MLP) or grok-transformer (1 layer)", choices=MODELS)
    dataset: str = option("modular", "only 'modular': the task is set by --p, --op, --train-fraction, --ordered "
                                     "and --data-seed", choices=("modular",))
    validation: Optional[int] = option(None, "pairs held out of the test pairs as a validation split (default: "
                                             "none; the validation columns are then the training set)")
    optimizer: str = override(ExperimentConfig, "optimizer", "adamw")
    learning_rate: float = override(ExperimentConfig, "learning_rate", 1e-3)
    weight_decay: float = override(ExperimentConfig, "weight_decay", 1.0)
    batch_size: int = option(0, "training minibatch size; 0: full batch (the paper: every step sees every "
                                "training pair)")
    num_steps: int = option(40000, "training steps of every arm (a multiple of --eval-every)")
    eval_every: int = option(100, "steps between evaluations on the whole training and test sets")
    p: int = option(67, "the modulus")
    op: str = option("+", "the operation", choices=tuple(OPS))
    train_fraction: float = option(0.4, "fraction of the pairs used for training (the rest is the test set)")
    ordered: bool = option(False, "all p² ordered pairs (else the reference's unordered pairs a <= b)")
    data_seed: int = option(0, "seed of the train/test split (the same for every seed)")
    loss: str = option("precise", "cross-entropy: 'precise' stays accurate near 0 loss in float32 (as the "
                                  "reference's float64; lottojax.grokking.precise_cross_entropy), 'float32' is "
                                  "optax's, which rounds to 0 there", choices=LOSSES)
    beta1: float = option(0.9, "AdamW's beta1")
    beta2: float = option(0.98, "AdamW's beta2")
    density: float = option(0.4, "fraction of the weights every mask keeps")
    threshold: float = option(0.95, "the test accuracy whose first step is reported")
    arms: tuple[str, ...] = option(tuple(ARMS), "arms trained (lottojax.experiments.grokking.ARMS; dense always "
                                                "runs first)", choices=tuple(ARMS))
    memorisation_threshold: float = option(0.99, "memorisation checkpoint: first evaluation with training "
                                                 "accuracy at or above this")
    transition_threshold: float = option(0.5, "transition checkpoint: first evaluation with test accuracy at or "
                                              "above this")
    snip_batch: int = option(100, "SNIP: training pairs in its one batch")
    grasp_per_class: int = option(10, "GraSP: pairs per class in its class-balanced sample")
    grasp_temperature: float = option(200.0, "GraSP: softmax temperature T")
    synflow_rounds: int = option(100, "SynFlow: pruning rounds (exponential schedule)")

    def check(self) -> None:
        """Raises :class:`ConfigError` naming the first bad field.

        Examples:
          >>> GrokkingConfig(density=1.5).check()
          Traceback (most recent call last):
          ...
          lottojax.experiments.base.ConfigError: density: 1.5 must be in (0, 1)
        """
        if self.batch_size < 0:
            raise ConfigError("batch_size", f"{self.batch_size} must be >= 0 (0: full batch)")
        check_fields(dataclasses.replace(self, batch_size=max(self.batch_size, 1)))
        if self.num_steps % self.eval_every:
            raise ConfigError("num_steps", f"{self.num_steps} must be a multiple of eval_every={self.eval_every}")
        if self.p < 2:
            raise ConfigError("p", f"{self.p} must be >= 2")
        if not 0 < self.train_fraction < 1:
            raise ConfigError("train_fraction", f"{self.train_fraction} must be in (0, 1)")
        for name in ("density",):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be in (0, 1)")
        for name in ("threshold", "memorisation_threshold", "transition_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(name, f"{getattr(self, name)} must be in (0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"{self.weight_decay} must be >= 0")
        if self.data_seed < 0:
            raise ConfigError("data_seed", f"{self.data_seed} must be >= 0")
        for name in ("snip_batch", "grasp_per_class", "synflow_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not self.grasp_temperature > 0:
            raise ConfigError("grasp_temperature", f"{self.grasp_temperature} must be > 0")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError("arms", f"{self.arms}: an arm is repeated")

    def method(self, name: str):
        """The registered pruning method ``name`` with this config's hyperparameters."""
        hparams = {"snip": dict(batch_size=self.snip_batch),
                   "grasp": dict(per_class=self.grasp_per_class, temperature=self.grasp_temperature),
                   "synflow": dict(rounds=self.synflow_rounds)}
        return get_method(name, **hparams.get(name, {}))

    def arm_names(self) -> tuple[str, ...]:
        """``'dense'`` first, then the other arms in the order given."""
        return ("dense",) + tuple(a for a in self.arms if a != "dense")


class Setup(NamedTuple):
    """The data (on the device), the model and one trainer per weight-decay setting."""

    data: object
    model: object
    trainers: dict  # {True: with the config's weight decay, False: without}
    keep: int  # weights every mask keeps
    total: int  # prunable weights (every matrix)
    vocab: int  # rows of the embedding: SynFlow's one-hot input is (2, vocab)


def optimizer(config: GrokkingConfig, weight_decay: float) -> optax.GradientTransformation:
    """AdamW with the config's betas (or another ``config.optimizer``), ending with
    :func:`lottojax.masked_updates`."""
    schedule = learning_rate_schedule(config, config.num_steps)
    if config.optimizer == "adamw":
        return optax.chain(optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=weight_decay),
                           masked_updates())
    return make_optimizer(config.optimizer, schedule, momentum=config.momentum, weight_decay=weight_decay)


def build_grokking(config: GrokkingConfig) -> Setup:
    """Dataset, model and trainers of a config."""
    from lottojax.models import create

    data = modular_arithmetic(config.p, config.op, config.train_fraction, config.data_seed, config.ordered,
                              validation=config.validation)
    n_train = len(data.x_train)
    batch = n_train if config.batch_size == 0 else config.batch_size
    if batch > n_train:
        raise ConfigError("batch_size", f"{batch} exceeds the {n_train} training pairs")
    model = create(config.model, input_shape=(2,), num_classes=config.p)
    loss = precise_cross_entropy if config.loss == "precise" else cross_entropy
    trainers = {wd: make_trainer(model, optimizer(config, config.weight_decay if wd else 0.0), batch_size=batch,
                                 eval_every=config.eval_every, eval_batch_size=max(len(data.x_test), n_train),
                                 loss=loss)
                for wd in (True, False)}
    params = jax.eval_shape(model.init, jax.random.key(0))[0]
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params) if len(x.shape) >= 2)
    keep = int(round(config.density * total))
    vocab = params["embed"]["embedding"].shape[0]
    return Setup(jax.device_put(data), model, trainers, keep, total, vocab)


def _magnitude_mask(params: PyTree, keep: int, key) -> PyTree:
    return prune_with("magnitude", params, ones_like(params), key=key, keep=keep, scope="global")


def _kept(mask: PyTree) -> jax.Array:
    return sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(mask) if m.ndim >= 2)


def _programs(config: GrokkingConfig, setup: Setup) -> dict[str, Callable]:
    """``arm -> one_seed(init_key, data_key, mask_key, dense_masks, data) -> record``."""
    model, keep = setup.model, setup.keep
    capture = {"memorisation": ("train_accuracy", config.memorisation_threshold),
               "transition": ("test_accuracy", config.transition_threshold)}
    train = lambda trainer, state, data, key, **kw: train_curves(
        trainer, state, data, key, num_steps=config.num_steps, eval_every=config.eval_every, **kw)

    def dense(init_key, data_key, mask_key, dense_masks, data):
        del mask_key, dense_masks
        trainer = setup.trainers[True]
        state = trainer.init(init_key)
        initial_norm = params_norm(state.params)
        state, curves, captured = train(trainer, state, data, data_key, capture=capture)
        masks = {"ticket": _magnitude_mask(state.params, keep, init_key),
                 **{name: _magnitude_mask(c.params, keep, init_key) for name, c in captured.items()}}
        return dict(curves=curves, masks=masks, captured_step={name: c.step for name, c in captured.items()},
                    kept=jnp.asarray(setup.total, jnp.int32), initial_norm=initial_norm,
                    final_norm=params_norm(state.params), pruned_max=jnp.zeros(()))

    def arm_program(arm: Arm):
        def one_seed(init_key, data_key, mask_key, dense_masks, data):
            params0, model_state = model.init(init_key)
            context = ScoreContext(apply_fn=lambda p, x: model.apply(p, model_state, x, True)[0],
                                   eval_apply_fn=lambda p, x: model.apply(p, model_state, x, False)[0],
                                   x=data.x_train, y=data.y_train, input_shape=(2, setup.vocab),
                                   num_classes=config.p)
            if arm.mask is None:
                mask = ones_like(params0)
            elif arm.mask in DENSE_MASKS:
                mask = dense_masks[arm.mask]
            else:
                mask = prune_with(config.method(arm.mask), params0, ones_like(params0), key=mask_key,
                                  context=context, keep=keep, scope="global")
            trainer = setup.trainers[arm.weight_decay]
            state = trainer.init(init_key, None if arm.mask is None else mask)
            if arm.scale is not None:
                state = state._replace(params=scale_to_norm(state.params, apply_mask(params0, dense_masks["ticket"]),
                                                            mode=arm.scale))
            initial_norm = params_norm(state.params)
            state, curves, _ = train(trainer, state, data, data_key)
            pruned = [jnp.max(jnp.where(m, 0.0, jnp.abs(w)), initial=0.0)
                      for w, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask))]
            return dict(curves=curves, kept=_kept(mask), initial_norm=initial_norm,
                        final_norm=params_norm(state.params), pruned_max=jnp.max(jnp.stack(pruned)))

        return one_seed

    return {name: dense if name == "dense" else arm_program(ARMS[name]) for name in ARMS}


@exclusive("grokking")
def run_grokking(config: GrokkingConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "grokking", config) as workdir:
        setup = build_grokking(config)
        programs = _programs(config, setup)
        n = len(config.seeds)
        keys = stream_keys(config, "init", "data", "mask")
        data = put_seeded(setup.data, config.devices, stacked=False)
        records: dict[str, dict] = {}
        dense_masks = None
        for name in config.arm_names():
            program = over_seeds(config, programs[name], (0, 0, 0, 0, None))
            masks_in = {} if name == "dense" else dense_masks
            template = {"record": jax.eval_shape(program, *keys, masks_in, data), "seconds": 0.0}

            def train():  # called at once, in this iteration
                start = time.perf_counter()
                record = jax.block_until_ready(program(*keys, masks_in, data))
                return {"record": gather(record), "seconds": np.asarray(time.perf_counter() - start)}

            saved, fresh = load_or_run(os.path.join(workdir, "arms", f"{name}.npz"), train, save=save_arrays,
                                       load=lambda path: load_arrays(path, template))
            if fresh and jax.process_index() == 0:
                curves = jax.tree.map(lambda x: np.asarray(x)[:n], saved["record"]["curves"])
                log_history(workdir, name, curves, {"seed": config.seeds})
            record = jax.tree.map(lambda x: np.asarray(x)[:n], saved["record"])
            record["seconds"] = float(saved["seconds"])
            records[name] = record
            if name == "dense":
                dense_masks = put_seeded(jax.tree.map(lambda x: np.asarray(x), saved["record"]["masks"]),
                                         config.devices, stacked=True)
            if progress:
                print(_progress_line(config, name, record), flush=True)
        summary = summarize(config, setup, records)
        if jax.process_index() == 0:
            arrays = {f"{arm}/{field}": np.asarray(getattr(r["curves"], field))
                      for arm, r in records.items() for field in r["curves"]._fields}
            write_results(workdir, summary, {k.replace("/", "__"): v for k, v in arrays.items()})
            plot_grokking(summary, os.path.join(workdir, "grokking.png"),
                          title=f"Grokking tickets: (a {config.op} b) mod {config.p}, {config.model}, "
                                f"{plural(len(config.seeds), 'seed')}")
    return summary, workdir


def _steps(config: GrokkingConfig, record: dict, metric: str = "test_accuracy",
           threshold: Optional[float] = None) -> np.ndarray:
    """Steps to the threshold per seed, NaN where never reached."""
    steps = np.asarray(steps_to_threshold(record["curves"], config.threshold if threshold is None else threshold,
                                          metric=metric)).astype(np.float64)
    return np.where(steps == NEVER, np.nan, steps)


def _step_stats(steps: np.ndarray) -> dict:
    """:func:`~lottojax.experiments.store.stats` of steps (NaN: never), ``never`` counted."""
    s = stats(steps)
    s["never"] = s.pop("diverged")
    return s


def _progress_line(config: GrokkingConfig, name: str, record: dict) -> str:
    steps = _steps(config, record)
    s = stats(steps)
    cell = "never" if s["mean"] is None else f"{s['mean']:.0f} ± {s['std']:.0f}"
    final = 100 * np.asarray(record["curves"].test_accuracy)[:, -1]
    return (f"{name:>21}: steps to {100 * config.threshold:g}% test acc {cell} ({s['n']}/{len(steps)} seeds), "
            f"final test acc {final.mean():.1f}%  ({record['seconds']:.0f} s)")


def _curve(curves, field: str) -> dict:
    values = np.asarray(getattr(curves, field), np.float64)
    return {"mean": values.mean(0).round(6).tolist(), "min": values.min(0).round(6).tolist(),
            "max": values.max(0).round(6).tolist()}


def summarize(config: GrokkingConfig, setup: Setup, records: dict) -> dict:
    """The JSON summary: per arm the steps to the threshold (NaN per seed where never),
    ``never`` (how many seeds did not get there), final accuracies, density, norms, the
    largest pruned weight after training (0: pruned weights stayed pruned) and the mean,
    min and max curves over seeds."""
    arms = {}
    dense_mean = None
    for name, record in records.items():
        s = _step_stats(_steps(config, record))
        if name == "dense":
            dense_mean = s["mean"]
        curves = record["curves"]
        diverged = diverged_runs(curves.train_loss, curves.test_loss)  # left out of the final-value stats
        entry = {
            "label": ARMS[name].label,
            "steps_to_threshold": s,
            "ratio_to_dense": (None if s["mean"] is None or not dense_mean else round(s["mean"] / dense_mean, 4)),
            "steps_to_memorise": _step_stats(_steps(config, record, "train_accuracy", config.memorisation_threshold)),
            "final_test_accuracy": stats(np.asarray(curves.test_accuracy)[:, -1], diverged=diverged),
            "final_train_accuracy": stats(np.asarray(curves.train_accuracy)[:, -1], diverged=diverged),
            "density": stats(np.asarray(record["kept"]) / setup.total),
            "initial_norm": stats(record["initial_norm"]),
            "final_norm": stats(record["final_norm"], diverged=diverged),
            "pruned_max": float(np.max(record["pruned_max"])),
            "seconds": record["seconds"],
            "curve": {"step": np.asarray(curves.step)[0].tolist(), "test_accuracy": _curve(curves, "test_accuracy"),
                      "train_accuracy": _curve(curves, "train_accuracy")},
        }
        if name == "dense":
            entry["checkpoint_steps"] = {k: np.asarray(v).tolist() for k, v in record["captured_step"].items()}
        arms[name] = entry
    return {"config": dataclasses.asdict(config), "keep": setup.keep, "total": setup.total, "arms": arms}


def grokking_table(summary: dict) -> str:
    """Per arm: steps to the threshold test accuracy (mean ± std over the seeds that got
    there), how many seeds got there, the mean as a multiple of dense's, and the final
    test accuracy (%).

    Examples:
      >>> arm = lambda m, s, n, never, acc, r: {'label': 'x', 'steps_to_threshold': {'mean': m, 'std': s, 'n': n,
      ...     'never': never}, 'ratio_to_dense': r, 'final_test_accuracy': {'mean': acc, 'std': 0.0}}
      >>> s = {'config': {'threshold': 0.95, 'num_steps': 3000}, 'arms': {
      ...     'dense': arm(2000., 100., 2, 0, 1.0, 1.0), 'random': arm(None, None, 0, 2, .3, None)}}
      >>> print(grokking_table(s))
      arm                  | steps to 95% test acc | reached | vs dense | final test acc (%)
      dense                |           2000 ± 100  |   2/2   |   1.00x  | 100.00 ± 0.00
      random               |   never (in 3000)     |   0/2   |      -   |  30.00 ± 0.00
    """
    config = summary["config"]
    lines = [f"{'arm':<20} | steps to {100 * config['threshold']:g}% test acc | reached | vs dense | "
             f"final test acc (%)"]
    for name, arm in summary["arms"].items():
        s = arm["steps_to_threshold"]
        total = s["n"] + s["never"]
        cell = f"{s['mean']:>10.0f} ± {s['std']:<5.0f}" if s["mean"] is not None else \
            f"  never (in {config['num_steps']})".ljust(18)
        ratio = f"{arm['ratio_to_dense']:6.2f}x" if arm["ratio_to_dense"] is not None else "     - "
        final = arm["final_test_accuracy"]
        lines.append(f"{name:<20} | {cell:>21} |   {s['n']}/{total}   | {ratio:>8} | "
                     f"{100 * final['mean']:6.2f} ± {100 * final['std']:.2f}")
    return "\n".join(lines)


def plot_grokking(summary: dict, path: str, *, title: str = "") -> None:
    """Test accuracy (left) and training accuracy (right, log-scaled steps) vs step per arm:
    the mean over seeds (dense and ticket shaded between the seeds' minimum and maximum);
    the threshold as a dotted line, named in the left panel's legend."""
    import matplotlib

    fig, (test_ax, train_ax) = figure(2, width=7.0, height=4.6)
    colors = matplotlib.colormaps["tab20"].colors
    for i, (name, arm) in enumerate(summary["arms"].items()):
        curve, color = arm["curve"], colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        style = "-" if name in ("dense", "ticket") else "--" if name.startswith("equal-norm") else "-."
        width = 2.0 if name in ("dense", "ticket") else 1.2
        for ax, field in ((test_ax, "test_accuracy"), (train_ax, "train_accuracy")):
            c = curve[field]
            ax.plot(curve["step"], 100 * np.asarray(c["mean"]), style, color=color, linewidth=width,
                    label=name if arm["label"] == name else f"{name} ({arm['label']})")
            if name in ("dense", "ticket"):  # the other arms' bands would hide the curves
                ax.fill_between(curve["step"], 100 * np.asarray(c["min"]), 100 * np.asarray(c["max"]), color=color,
                                alpha=0.15, linewidth=0)
    threshold = summary["config"]["threshold"]
    line = test_ax.axhline(100 * threshold, color="gray", linewidth=0.8, linestyle=":",
                           label=f"{threshold:.0%} threshold")
    test_ax.legend(handles=[line], fontsize=7, loc="lower right")  # the arms are named in the right panel's legend
    train_ax.set_xscale("symlog", linthresh=max(summary["config"]["eval_every"], 1))  # memorisation is early
    for ax, what in ((test_ax, "test"), (train_ax, "training")):
        ax.set_xlabel("step (full batch)" + (", log scale" if ax is train_ax else ""))
        ax.set_ylabel(f"{what} accuracy (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    train_ax.legend(fontsize=7, loc="lower right")
    save(fig, path, title=title, note=spread_note(len(summary["config"]["seeds"]), "min-max") + " (dense and ticket)")
