"""Lottery Jackpots (Zhang et al.): masks searched on a frozen pre-trained network.

:func:`run_jackpots` is what ``python experiments/jackpots.py`` runs; a notebook can call it
the same way. For every seed (``seed_strategy`` over ``devices``) it

1. pre-trains the dense network with the library (the base config's optimizer, batch size
   and ``num_steps``: by default Adam 1.2e-3, batch 60, 3000 steps on MNIST-1D), and saves
   it as a ticket (``dense.npz``: an all-True mask and the trained weights, every seed) that
   a resumed run loads instead of training again;
2. freezes it and, for every sparsity in ``sparsities`` (default 90% and 95% of the
   searched weights; the classifier stays dense) and every arm of ``arms`` (the registry
   :data:`ARMS`), builds the starting mask with :func:`lottojax.jackpots.jackpot_init` and
   searches ``search_steps`` steps with :func:`lottojax.jackpots.make_searcher` (SGD on the
   scores, lr ``search_learning_rate`` cosine-decayed to 0, momentum, weight decay added to
   the gradient, batch ``search_batch_size``, one short restriction after every step), all
   seeds of an arm in one compiled program, evaluating every ``search_eval_every`` steps.

The arms (:data:`ARMS`):

- ``magnitude``: the starting mask, not searched (global magnitude of the trained weights);
- ``search``: searched with the swap rate ≡ 1 (both reference scripts);
- ``search-quartic`` / ``search-cosine``: the rate decays as ``(1 − e/E)^4`` /
  ``½(1 + cos πe/E)`` (the paper's decaying rate; the reference's dead code);
- ``random-init``: a random starting mask with the magnitude mask's per-layer counts (its
  entries permuted within each layer), searched with rate 1;
- ``random-net``: the same search (magnitude start, rate 1) on the frozen *untrained*
  network θ0 of the seed (the initialisation its pre-training started from);
- ``search-third``: the ``search`` arm with a third of the steps (its learning rate
  cosine-decayed over that shorter search): does the magnitude start reach in a third of
  the steps what the random start reaches in all of them?

``arms`` and ``sparsities`` only add work, so they are left out of the run directory's
hash: asking a finished run for another arm or sparsity computes just that one. Every
search arm of a seed sees the same minibatches (the seed's data key folded with
:data:`SEARCH_ORDER`). Test accuracy is that of the mask after the last step. Training loss
curves are the mean minibatch loss of each ``search_eval_every`` steps; step 0 is the
starting mask's loss on the whole training split. Search cost: for each seed, ``L`` =
random-init's final training loss; the table gives the steps random-init and the
magnitude-initialised search (rate 1) take to first reach ``L`` and their ratio (within
runs whose cosine learning rate spans all steps: the loss drops late in both), and in how
many seeds ``search-third`` ends at or below ``L``.

It writes into ``<root>/jackpots-<config hash>/``: ``config.json``, ``dense.npz`` (the
pre-trained nets), ``arms/<arm>-s<sparsity>.npz`` (each arm's per-seed curves, once
searched: a killed run resumes after the last finished arm), ``tickets/<arm>-s<sparsity>.npz``
(the final masks with the frozen weights, :func:`lottojax.load_ticket`), ``results.json``
(mean, std, n and per-seed values), ``results.npz``, ``jackpots.png`` (test accuracy and
training loss vs search step per arm) and ``table.txt``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from types import MappingProxyType
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import load_arrays, save_arrays
from lottojax.experiments.base import ConfigError, ExperimentConfig, build, option, over_seeds, seed_slots, stream_keys
from lottojax.experiments.metrics import log_history
from lottojax.experiments.plots import dense_line, figure, plural, save, spread_note
from lottojax.experiments.store import (diverged_runs, exclusive, load_or_run, mean_std, open_run, stats,
                                        write_results)
from lottojax.jackpots import (
    jackpot_init,
    jackpot_optimizer,
    jackpot_scores,
    make_searcher,
    restriction_rate,
    searched_flags,
)
from lottojax.masks import apply_mask, leaves_with_paths, ones_like
from lottojax.rewind import shuffle_mask
from lottojax.seeds import gather, put_seeded, seed_keys
from lottojax.tickets import load_ticket, save_ticket

#: The search's data order: the seed's ``data`` key stream folded in with this constant
#: (pre-training folds epochs 0, 1, ... into the unfolded key).
SEARCH_ORDER = 1_000_003


class Arm(NamedTuple):
    """One compared arm: which frozen net (``'trained'`` or ``'random'``: θ0), which start
    (``'magnitude'`` or ``'random'``: the magnitude mask permuted within each layer), the
    restriction-rate schedule (a kind of :func:`lottojax.jackpots.restriction_rate`;
    ``None``: no search) and the search length as a fraction of ``search_steps`` (its
    learning-rate and rate schedules span that length)."""

    net: str
    start: str
    rate: Optional[str]
    help: str
    length: float = 1.0

    def steps(self, config) -> int:
        """The arm's search steps under ``config`` (at least 1)."""
        return max(1, int(round(self.length * config.search_steps)))


#: The arms, by name. A new arm is one line here.
ARMS = MappingProxyType({
    "magnitude": Arm("trained", "magnitude", None, "magnitude mask of the trained net, not searched"),
    "search": Arm("trained", "magnitude", "constant", "searched, rate ≡ 1 (reference code)"),
    "search-quartic": Arm("trained", "magnitude", "quartic", "searched, rate (1 − e/E)^4"),
    "search-cosine": Arm("trained", "magnitude", "cosine", "searched, rate ½(1 + cos πe/E)"),
    "random-init": Arm("trained", "random", "constant", "random start at the same per-layer counts, rate 1"),
    "random-net": Arm("random", "magnitude", "constant", "searched on the untrained net θ0, rate 1"),
    "search-third": Arm("trained", "magnitude", "constant", "searched, rate 1, a third of the steps (its own "
                                                             "cosine): the search-cost check", length=1 / 3),
})


@dataclasses.dataclass(frozen=True)
class JackpotConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D reproduction of §4.

    The inherited optimizer fields are the *pre-training*'s (the MLP 40-300-100-10, Adam
    1.2e-3, batch 60, 3000 steps); the ``search_*`` fields the search's (SGD 0.1 with a
    per-step cosine to 0, momentum 0.9, weight decay 5e-4, batch 256, 1500 steps).
    """

    sparsities: tuple[float, ...] = option((0.9, 0.95), "fractions of the searched weights pruned (the layer named "
                                                        "by --keep-dense stays dense)", extends=True)
    arms: tuple[str, ...] = option(tuple(ARMS), "compared arms (lottojax.experiments.jackpots.ARMS)",
                                   choices=tuple(ARMS), extends=True)
    search_steps: int = option(1500, "search steps per arm")
    search_batch_size: int = option(256, "search minibatch size")
    search_learning_rate: float = option(0.1, "initial search learning rate, cosine-decayed to 0")
    search_momentum: float = option(0.9, "search momentum (PyTorch SGD: weight decay added before momentum)")
    search_weight_decay: float = option(5e-4, "weight decay on the scores")
    search_eval_every: int = option(50, "search steps between evaluations (the resolution of the curves)")
    per_epoch: bool = option(False, "decay the learning rate and the decaying swap rates once per epoch (the "
                                    "reference's CosineAnnealingLR) instead of every step")
    keep_dense: str = option("output", "the layer kept dense (the classifier); 'none' searches every kernel")
    skip_on_tie: bool = option(False, "the reference's rule: skip a layer for a step when ties at τ make |D| > |R|")

    def check(self) -> None:
        super().check()
        if not self.sparsities or not all(0 < s < 1 for s in self.sparsities):
            raise ConfigError("sparsities", f"{self.sparsities} must be fractions in (0, 1)")
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ConfigError("sparsities", f"{self.sparsities}: a sparsity is repeated")
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError("arms", f"{self.arms}: give distinct arms")
        for name in ("search_steps", "search_batch_size", "search_eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not self.search_learning_rate > 0:
            raise ConfigError("search_learning_rate", f"{self.search_learning_rate} must be > 0")
        if not 0 <= self.search_momentum < 1:
            raise ConfigError("search_momentum", f"{self.search_momentum} must be in [0, 1)")
        if self.search_weight_decay < 0:
            raise ConfigError("search_weight_decay", f"{self.search_weight_decay} must be >= 0")
        if not self.keep_dense:
            raise ConfigError("keep_dense", "give a layer name, or 'none'")

    @property
    def dense_layer(self) -> Optional[str]:
        """``keep_dense`` as :func:`lottojax.jackpots.searched_flags` takes it."""
        return None if self.keep_dense == "none" else self.keep_dense


def sparsity_tag(sparsity: float) -> str:
    """A file-name tag of a sparsity: ``'s90'``, ``'s95'``, ``'s97.5'``.

    Examples:
      >>> sparsity_tag(0.9), sparsity_tag(0.975)
      ('s90', 's97.5')
    """
    return f"s{round(100 * sparsity, 6):g}"


class _Context(NamedTuple):
    config: JackpotConfig
    setup: object
    n: int  # real seeds (the slots may be padded for devices)
    slots: tuple
    data: object
    trained: tuple  # (params, model_state), leaves (slots, ...)
    theta0: tuple
    control_keys: jax.Array
    order_keys: jax.Array
    workdir: str
    progress: bool


def _pretrain(config: JackpotConfig, setup, slots, data, workdir: str, progress: bool):
    """The dense nets of every seed slot: trained now, or loaded from ``dense.npz``.
    Returns ``((params, model_state), test_accuracy (n,), seconds)``."""
    model, trainer = setup.model, setup.trainer
    n = len(config.seeds)
    path, state_path = os.path.join(workdir, "dense.npz"), os.path.join(workdir, "dense-model-state.npz")
    (init_keys,) = stream_keys(config, "init")
    shapes = jax.eval_shape(jax.vmap(model.init), init_keys)
    if os.path.exists(path):
        ticket = load_ticket(path, like=shapes[0])
        model_state = load_arrays(state_path, shapes[1]) if jax.tree.leaves(shapes[1]) else shapes[1]
        params = put_seeded(ticket.params, config.devices, stacked=True)
        model_state = put_seeded(jax.tree.map(jnp.asarray, model_state), config.devices, stacked=True)
        meta = ticket.metadata
        return (params, model_state), np.asarray(meta["test_accuracy"])[:n], float(meta["seconds"])
    start = time.perf_counter()
    (data_keys,) = stream_keys(config, "data")

    def one_seed(init_key, data_key, data):
        state, history = trainer.train(trainer.init(init_key), data, data_key, start=0, num_steps=config.num_steps)
        return state.params, state.model_state, history.test_accuracy[-1], history

    params, model_state, accuracy, history = over_seeds(config, one_seed, (0, 0, None))(init_keys, data_keys, data)
    host = gather((params, model_state, accuracy))
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
        log_history(workdir, "dense", jax.tree.map(lambda h: np.asarray(h)[:n], gather(history)), {"seed": config.seeds})
        if jax.tree.leaves(host[1]):
            save_arrays(state_path, host[1])
        save_ticket(path, mask=ones_like(host[0]), params=host[0], seeds=True,
                    metadata={"what": "dense pre-trained nets, one per seed slot", "seeds": list(slots),
                              "test_accuracy": np.asarray(host[2]).tolist(), "num_steps": config.num_steps,
                              "seconds": seconds})
    if progress:
        print(f"pre-trained dense: {mean_std(np.asarray(host[2])[:n])} test accuracy ({seconds:.0f} s)", flush=True)
    return (params, model_state), np.asarray(host[2])[:n], seconds


class _Programs:
    """The compiled programs, built once per run and reused by every sparsity and arm:
    ``start`` (scores and mask of every seed) and one search per rate schedule."""

    def __init__(self, context: _Context):
        self.context = context
        self._search = {}
        config, setup = context.config, context.setup
        keep_dense = config.dense_layer

        def start(params, control_key, density, random_start):
            scores, mask = jackpot_init(params, density=density, keep_dense=keep_dense)
            if random_start:  # the same per-layer counts, the positions permuted within each layer
                flag_of = dict(zip(leaves_with_paths(mask)[0], searched_flags(mask, keep_dense=keep_dense, name="mask")))
                mask = shuffle_mask(mask, key=control_key, prunable=lambda path, leaf: flag_of[path])
                scores = jackpot_scores(mask, keep_dense=keep_dense)
            return scores, mask

        self.start = {flag: over_seeds(config, lambda p, k, d, flag=flag: start(p, k, d, flag), (0, 0, None))
                      for flag in (False, True)}

        def evaluate(params, model_state, mask, data):
            weights = apply_mask(params, mask)
            metrics = [setup.trainer.evaluate(weights, model_state, x, y)
                       for x, y in ((data.x_train, data.y_train), (data.x_val, data.y_val), (data.x_test, data.y_test))]
            return metrics[0].loss, metrics[1].accuracy, metrics[2].accuracy

        self.evaluate = over_seeds(config, evaluate, (0, 0, 0, None))

    def searcher(self, kind: str, num_steps: int):
        config = self.context.config
        steps_per_epoch = self.context.data.x_train.shape[0] // config.search_batch_size
        per = steps_per_epoch if config.per_epoch else None
        tx = jackpot_optimizer(config.search_learning_rate, num_steps=num_steps,
                               momentum=config.search_momentum, weight_decay=config.search_weight_decay,
                               steps_per_epoch=per)
        return make_searcher(self.context.setup.model, tx, batch_size=config.search_batch_size,
                             eval_every=config.search_eval_every,
                             rate=restriction_rate(kind, num_steps=num_steps, steps_per_epoch=per),
                             keep_dense=config.dense_layer, skip_on_tie=config.skip_on_tie)

    def search(self, kind: str, num_steps: int):
        if (kind, num_steps) not in self._search:
            searcher = self.searcher(kind, num_steps)

            def one_seed(params, model_state, scores, mask, order_key, data):
                state = searcher.init(params, scores, mask, model_state)
                state, history = searcher.search(state, data, order_key, start=0, num_steps=num_steps)
                return state.mask, state.params, history

            self._search[kind, num_steps] = over_seeds(self.context.config, one_seed, (0, 0, 0, 0, 0, None))
        return self._search[kind, num_steps]


def _search_arm(context: _Context, programs: _Programs, name: str, sparsity: float) -> dict:
    """:func:`_run_arm`, its tickets saved to ``tickets/<arm>-<sparsity>.npz`` (process 0);
    returns its record."""
    record, masks, params = _run_arm(context, programs, name, sparsity)
    if jax.process_index() == 0:
        save_ticket(os.path.join(context.workdir, "tickets", f"{name}-{sparsity_tag(sparsity)}.npz"), mask=masks,
                    params=params, seeds=True, metadata={"arm": name, "sparsity": sparsity,
                                                         "seeds": list(context.config.seeds),
                                                         "test_accuracy": record["test_accuracy"][:, -1].tolist()})
    return record


def _run_arm(context: _Context, programs: _Programs, name: str, sparsity: float) -> dict:
    """One arm at one sparsity for every seed: per-seed arrays (seeds first) and the final masks."""
    n = context.n
    arm = ARMS[name]
    params, model_state = context.trained if arm.net == "trained" else context.theta0
    start = time.perf_counter()
    scores, mask = programs.start[arm.start == "random"](params, context.control_keys, jnp.float32(1 - sparsity))
    loss0, val0, test0 = programs.evaluate(params, model_state, mask, context.data)
    record = {"step": np.zeros((1,), np.int32)}
    columns = {"train_loss": loss0, "val_accuracy": val0, "test_accuracy": test0,
               "overlap": jnp.ones_like(test0)}
    final_mask = mask
    if arm.rate is not None:
        search = programs.search(arm.rate, arm.steps(context.config))
        final_mask, frozen, history = search(params, model_state, scores, mask, context.order_keys, context.data)
        unchanged = jax.tree.map(lambda a, b: jnp.all(a == b), frozen, params)
        if not all(bool(u) for u in jax.tree.leaves(gather(unchanged))):
            raise AssertionError(f"arm {name}: the frozen weights changed during the search")
        history = gather(history)
        record["step"] = np.concatenate([record["step"], np.asarray(history.step)[0]])
        for key in columns:
            columns[key] = np.concatenate([np.asarray(gather(columns[key]))[:, None],
                                           np.asarray(getattr(history, key))], axis=1)
    else:
        columns = {k: np.asarray(gather(v))[:, None] for k, v in columns.items()}
    record.update({k: np.asarray(v)[:n] for k, v in columns.items()})
    record["seconds"] = np.array(time.perf_counter() - start)
    masks = jax.tree.map(lambda m: np.asarray(m)[:n], gather(final_mask))
    return record, masks, jax.tree.map(lambda p: np.asarray(p)[:n], gather(params))


@exclusive("jackpots")
def run_jackpots(config: JackpotConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "jackpots", config) as workdir:
        setup = build(config)
        searched_flags(jax.eval_shape(setup.model.init, jax.random.key(0))[0], keep_dense=config.dense_layer)
        n = len(config.seeds)
        slots = seed_slots(config)
        data = put_seeded(setup.data, config.devices, stacked=False)
        trained, dense_accuracy, dense_seconds = _pretrain(config, setup, slots, data, workdir, progress)
    init_keys, control_keys = stream_keys(config, "init", "control")
    theta0 = over_seeds(config, setup.model.init, (0,))(init_keys)
    order_keys = jax.vmap(jax.random.fold_in, (0, None))(seed_keys(slots, "data"), SEARCH_ORDER)
    order_keys = put_seeded(order_keys, config.devices, stacked=True)
    context = _Context(config, setup, n, slots, data, trained, theta0, control_keys, order_keys, workdir, progress)
    programs = _Programs(context)
    for directory in ("arms", "tickets"):
        os.makedirs(os.path.join(workdir, directory), exist_ok=True)
    results: dict = {}
    for sparsity in config.sparsities:
        tag = sparsity_tag(sparsity)
        for name in config.arms:
            record, fresh = load_or_run(os.path.join(workdir, "arms", f"{name}-{tag}.npz"),
                                        partial(_search_arm, context, programs, name, sparsity))
            results[(tag, name)] = record
            if not fresh:  # searched in an earlier call
                continue
            if jax.process_index() == 0:
                log_history(workdir, f"{name}-{tag}", {k: v for k, v in record.items() if k != "seconds"},
                            {"seed": config.seeds})
            if progress:
                print(f"{100 * sparsity:g}% {name:>15}: {mean_std(record['test_accuracy'][:, -1])} test accuracy "
                      f"({float(record['seconds']):.0f} s)", flush=True)
    summary = summarize(config, dense_accuracy, dense_seconds, results)
    if jax.process_index() == 0:
        write_results(workdir, summary, {f"{tag}/{name}/{k}": v for (tag, name), r in results.items()
                                         for k, v in r.items()} | {"dense_test_accuracy": dense_accuracy})
        with open(os.path.join(workdir, "table.txt"), "w") as f:
            f.write(jackpot_table(summary) + "\n")
        plot_jackpots(summary, os.path.join(workdir, "jackpots.png"),
                      title=f"Lottery Jackpots on {config.dataset} ({config.model}), {plural(n, 'seed')}, "
                            f"{config.search_steps} search steps")
    return summary, workdir


def steps_to_reach(steps: np.ndarray, losses: np.ndarray, target: float) -> Optional[int]:
    """The first step (after step 0) whose loss is at or below ``target``; ``None`` if never.

    Examples:
      >>> steps_to_reach(np.array([0, 50, 100]), np.array([0.1, 0.9, 0.5]), 0.5), steps_to_reach(np.array([0, 50]), np.array([1., 1.]), 0.5)
      (100, None)
    """
    for step, loss in zip(steps[1:], losses[1:]):
        if loss <= target:
            return int(step)
    return None


def _search_cost(arms: dict) -> dict:
    """Per seed: ``L`` = random-init's final training loss, the steps random-init and the
    magnitude-started search (rate 1) need to first reach it, their ratio; with
    ``search-third``, whether a third of the steps from the magnitude start reaches ``L``
    (and random-init's final test accuracy)."""
    random_init, search = arms["random-init"], arms["search"]
    rows = []
    for i in range(random_init["train_loss"].shape[0]):
        target = float(random_init["train_loss"][i, -1])
        slow = steps_to_reach(random_init["step"], random_init["train_loss"][i], target)
        fast = steps_to_reach(search["step"], search["train_loss"][i], target)
        rows.append((target, slow, fast))
    ratio = [s / f if (s is not None and f) else np.nan for _, s, f in rows]
    out = {"target_loss": stats([r[0] for r in rows]),
           "random_init_steps": [r[1] for r in rows], "search_steps": [r[2] for r in rows],
           "ratio": stats(ratio), "search_never": sum(r[2] is None for r in rows)}
    if "search-third" in arms:
        third = arms["search-third"]
        out["third"] = {
            "steps": int(third["step"][-1]),
            "loss_reached": int(np.sum(third["train_loss"][:, -1] <= random_init["train_loss"][:, -1])),
            "accuracy_reached": int(np.sum(third["test_accuracy"][:, -1] >= random_init["test_accuracy"][:, -1])),
            "n": int(third["train_loss"].shape[0]),
        }
    return out


def summarize(config: JackpotConfig, dense_accuracy, dense_seconds: float, results: dict) -> dict:
    """The JSON summary: the dense accuracy, then per sparsity and arm the final test
    accuracy and training loss (mean, std, n, per seed), the curves (mean and std per
    evaluation step) and the search-cost comparison."""
    out = {"config": dataclasses.asdict(config), "dense": {"test_accuracy": stats(dense_accuracy),
                                                           "seconds": dense_seconds}, "sparsities": {}}
    for sparsity in config.sparsities:
        tag = sparsity_tag(sparsity)
        arms = {}
        for name in config.arms:
            r = results[(tag, name)]
            diverged = diverged_runs(r["train_loss"])  # a NaN loss: left out of the accuracy stats
            arms[name] = {
                "test_accuracy": stats(r["test_accuracy"][:, -1], diverged=diverged),
                "train_loss": stats(r["train_loss"][:, -1]),
                "start_test_accuracy": stats(r["test_accuracy"][:, 0], diverged=diverged),
                "overlap": stats(r["overlap"][:, -1]),
                "curve": {"step": np.asarray(r["step"]).tolist(),
                          **{f"{k}_{f.__name__}": f(r[k], axis=0).tolist()
                             for k in ("test_accuracy", "train_loss", "overlap") for f in (np.mean, np.std)}},
                "seconds": float(r["seconds"]),
            }
        entry = {"sparsity": sparsity, "arms": arms}
        if "random-init" in arms and "search" in arms:
            entry["search_cost"] = _search_cost({name: results[(tag, name)] for name in config.arms})
        out["sparsities"][tag] = entry
    return out


def jackpot_table(summary: dict) -> str:
    """Per sparsity and arm: final test accuracy (%) and training loss, mean ± std (n), the
    start's test accuracy and the fraction of the start mask still kept; then the search
    cost (steps to random-init's final training loss).

    Examples:
      >>> s = lambda m: {'mean': m, 'std': 0.01, 'n': 2}
      >>> summary = {'dense': {'test_accuracy': s(0.66)}, 'sparsities': {'s90': {'sparsity': 0.9, 'arms': {
      ...     'search': {'test_accuracy': s(0.64), 'train_loss': s(0.7), 'start_test_accuracy': s(0.19),
      ...                'overlap': s(0.4)}}}}}
      >>> print(jackpot_table(summary))
      dense (pre-trained): 66.00 ± 1.00 (n=2)
      <BLANKLINE>
      sparsity 90%         test acc. (%)   train loss  start acc. (%)  start kept
        search        64.00 ± 1.00 (n=2)  0.700 ± 0.010  19.00 ± 1.00       40.0%
    """
    cell = lambda s, scale=100.0, d=2: f"{scale * s['mean']:.{d}f} ± {scale * s['std']:.{d}f}"
    lines = [f"dense (pre-trained): {cell(summary['dense']['test_accuracy'])} (n={summary['dense']['test_accuracy']['n']})"]
    for entry in summary["sparsities"].values():
        width = max(14, *(len(name) for name in entry["arms"])) + 2
        lines += ["", f"{'sparsity ' + format(100 * entry['sparsity'], 'g') + '%':<{width + 2}}"
                      f"   test acc. (%)      train loss   start acc. (%)  start kept"]
        for name, arm in entry["arms"].items():
            a = arm["test_accuracy"]
            lines.append(f"  {name:<{width}}{cell(a)} (n={a['n']})  {cell(arm['train_loss'], 1.0, 3)}  "
                         f"{cell(arm['start_test_accuracy']):>14}  {100 * arm['overlap']['mean']:9.1f}%")
        cost = entry.get("search_cost")
        if cost:
            show = lambda steps: ", ".join("never" if s is None else str(s) for s in steps)
            ratio = cost["ratio"]
            ratio_text = "n/a" if ratio["mean"] is None else f"{ratio['mean']:.1f} ± {ratio['std']:.1f} (n={ratio['n']})"
            lines.append(f"  steps to random-init's final train loss ({cell(cost['target_loss'], 1.0, 3)}): "
                         f"random-init [{show(cost['random_init_steps'])}], search [{show(cost['search_steps'])}]; "
                         f"ratio {ratio_text}")
            third = cost.get("third")
            if third:
                lines.append(f"  search-third ({third['steps']} steps) reaches random-init's final train loss in "
                             f"{third['loss_reached']}/{third['n']} seeds, its final test accuracy in "
                             f"{third['accuracy_reached']}/{third['n']}")
    return "\n".join(lines)


def plot_jackpots(summary: dict, path: str, *, title: str = "") -> None:
    """Per sparsity (rows): test accuracy and training loss vs search step per arm, mean ±
    std bands; the pre-trained dense accuracy as a dashed line; the unsearched magnitude
    mask as a dotted line."""
    from matplotlib.ticker import FuncFormatter

    entries = list(summary["sparsities"].values())
    fig, axes = figure(2, nrows=len(entries), width=6.0, height=3.8)
    dense = summary["dense"]["test_accuracy"]["mean"]
    for row, entry in enumerate(entries):
        acc_ax, loss_ax = axes[2 * row], axes[2 * row + 1]
        for i, (name, arm) in enumerate(entry["arms"].items()):
            curve = arm["curve"]
            steps = np.asarray(curve["step"])
            color = f"C{i}"
            for ax, key, scale in ((acc_ax, "test_accuracy", 100.0), (loss_ax, "train_loss", 1.0)):
                mean, std = scale * np.asarray(curve[f"{key}_mean"]), scale * np.asarray(curve[f"{key}_std"])
                if len(steps) == 1:
                    ax.axhline(mean[0], color=color, linestyle=":", linewidth=1.2, label=name)
                    continue
                ax.plot(steps, mean, color=color, linewidth=1.2, label=name)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        dense_line(acc_ax, 100 * dense)
        acc_ax.set_ylabel("test accuracy (%)")
        loss_ax.set_ylabel("training loss")
        loss_ax.set_yscale("log")
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        loss_ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if round(10 * y) % 2 == 0 else ""))
        for ax in (acc_ax, loss_ax):
            ax.set_xlabel("search step")
            ax.set_title(f"{100 * entry['sparsity']:g}% sparsity", fontsize=10)
            ax.grid(alpha=0.3)
        acc_ax.legend(fontsize=7, loc="lower right")
    save(fig, path, title=title, note=spread_note(summary["dense"]["test_accuracy"]["n"]))
