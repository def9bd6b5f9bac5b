"""HideNseek (Vallapuram et al.; PAPERS.md §9): federated sign supermasks against a binary
supermask and dense FedAvg, from one config.

:func:`run_federated` is what ``python experiments/federated.py`` runs; a notebook can call
it the same way. For every seed (``seed_strategy`` over ``devices``):

1. the server draws θ0 (the seed's ``init`` key stream) and prunes it once, data-free, to
   ``density`` of the prunable weights (kernels) with SynFlow (``synflow_rounds`` rounds,
   one global ranking: :func:`lottojax.methods.prune_with` with the registered
   ``'synflow'`` method); θ0 and the mask of every seed are saved as a ticket
   (``server.npz``) that a resumed run loads;
2. the training split is dealt to ``num_clients`` clients, non-IID (the seed's ``control``
   key): ``split='classes'``, exactly ``classes_per_client`` classes each
   (:func:`lottojax.federated.class_split`), or ``split='dirichlet'`` with concentration
   ``alpha`` (:func:`lottojax.federated.dirichlet_split`);
3. every arm of ``arms`` (:data:`lottojax.federated.FEDERATED_METHODS`) runs ``rounds``
   rounds from the same θ0, mask and clients: all clients train ``local_epochs`` local
   epochs (batch ``batch_size``, a fresh ``optimizer`` each round: the sign and binary
   arms on their scores with ``score_learning_rate``, ``dense`` on the weights with
   ``learning_rate``), the server aggregates, and the aggregated model is evaluated on the
   test split after every round. All rounds of all seeds of an arm are one compiled
   program (a ``lax.scan`` over rounds of a ``vmap`` over clients); round ``r`` of a seed
   uses its ``data`` key folded with ``r``.

The arms: ``sign-mean`` (HideNseek: ``θ0 ⊙ m ⊙ sign(s)``, scores from ``+1``, mean of the
scores, one float32 per kept weight uplink), ``sign-vote`` (the same, the server keeps the
weighted majority sign: one bit per kept weight), ``binary`` (a {0,1} mask on θ0 at the
density and per-layer counts of ``m``, scores starting at ``m``, mean aggregation: one
float32 per weight) and ``dense`` (FedAvg of all weights from θ0: one float32 per weight).
Uplink bits per round are ``num_clients`` times what one client sends.

It writes into ``<root>/federated-<config hash>/``: ``config.json``, ``server.npz``,
``arms/<arm>.npz`` (each arm's per-seed curves and its final server state, once run: a
killed run resumes after the last finished arm; ``arms`` is left out of the hash, so adding
an arm runs just that one), ``results.json`` (mean, std, n and per-seed values),
``results.npz``, ``federated.png`` (test accuracy vs round and vs cumulative uplink) and
``table.txt``.

Divergence: a seed whose arm's client training loss or test loss became NaN or inf
(:func:`arm_diverged`) is NaN in that arm's statistics, left out of its means and curves
and counted (the table says ``(n=.., k diverged)``, ``results.json`` lists it).
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.experiments.base import (
    ConfigError,
    ExperimentConfig,
    check_dataset,
    load_dataset,
    make_optimizer,
    model_kwargs,
    option,
    over_seeds,
    override,
    seed_slots,
    stream_keys,
)
from lottojax.experiments.metrics import log_history
from lottojax.experiments.plots import figure, plural, save
from lottojax.experiments.store import (diverged_runs, exclusive, load_or_run, mean_std, open_run, stats,
                                        write_results)
from lottojax.federated import (
    FEDERATED_METHODS,
    ClientData,
    class_split,
    client_data,
    dirichlet_split,
    make_client_update,
    make_federated_round,
    run_rounds,
    uplink_bits,
)
from lottojax.masks import density, leaves_with_paths, ones_like
from lottojax.methods import ScoreContext, get_method, prune_with
from lottojax.seeds import gather, put_seeded, seed_keys
from lottojax.tickets import load_ticket, save_ticket

#: The client splits, by name: ``(labels, config, key) -> client index per example``.
SPLITS = MappingProxyType({
    "classes": lambda labels, config, key: class_split(labels, num_clients=config.num_clients,
                                                        classes_per_client=config.classes_per_client, key=key),
    "dirichlet": lambda labels, config, key: dirichlet_split(labels, num_clients=config.num_clients,
                                                              alpha=config.alpha, key=key),
})

#: The config field holding each arm's client learning rate (the supermask arms train scores).
LEARNING_RATES = MappingProxyType({"sign-mean": "score_learning_rate", "sign-vote": "score_learning_rate",
                                   "binary": "score_learning_rate", "dense": "learning_rate"})

#: Rounds whose test accuracy the table shows (those within the run), besides the last.
TABLE_ROUNDS = (10, 25)


@dataclasses.dataclass(frozen=True)
class FederatedConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the small MNIST-1D setting of §9.

    The inherited ``optimizer`` (here plain SGD, as FedAvg), ``batch_size``, ``momentum``
    and ``weight_decay`` are the clients'; ``learning_rate`` (0.1) is dense FedAvg's,
    ``score_learning_rate`` (300) the supermask arms'. With SGD a score moves by
    ``lr · θ0 · ∂L/∂w``, the first-order gain of flipping that weight, so the big weights
    that matter flip first; Adam (which normalises that away) did worse in a 30-round
    tuning run on seed 0 (see ``docs/federated/README.md``). ``num_steps``, ``eval_every``
    and ``lr_drops`` do not apply (rounds and local epochs set the length; the model is
    evaluated after every round).
    """

    seeds: tuple[int, ...] = override(ExperimentConfig, "seeds", (0, 1, 2))
    optimizer: str = override(ExperimentConfig, "optimizer", "sgd")
    learning_rate: float = override(ExperimentConfig, "learning_rate", 0.1)
    arms: tuple[str, ...] = option(tuple(FEDERATED_METHODS), "compared arms (lottojax.federated.FEDERATED_METHODS)",
                                   choices=tuple(FEDERATED_METHODS), extends=True)
    num_clients: int = option(10, "clients (all take part in every round)")
    split: str = option("classes", "non-IID split of the training data: classes (classes-per-client each) or "
                                   "dirichlet (class proportions ~ Dir(alpha))", choices=tuple(SPLITS))
    classes_per_client: int = option(2, "classes per client with --split classes")
    alpha: float = option(0.5, "Dirichlet concentration with --split dirichlet (small: skewed)")
    rounds: int = option(50, "communication rounds")
    local_epochs: int = option(2, "local epochs per round (E)")
    density: float = option(0.2, "fraction of the prunable weights the server's SynFlow mask keeps")
    synflow_rounds: int = option(100, "SynFlow pruning rounds")
    score_learning_rate: float = option(300.0, "the clients' learning rate on the scores (sign and binary arms; "
                                               "their gradient is θ0 ⊙ ∂L/∂w, hence the size)")

    def check(self) -> None:
        super().check()
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError("arms", f"{self.arms}: give distinct arms")
        for name in ("num_clients", "classes_per_client", "rounds", "local_epochs", "synflow_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not 0 < self.density < 1:
            raise ConfigError("density", f"{self.density} must be in (0, 1)")
        if not (np.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError("alpha", f"{self.alpha} must be > 0")
        if not self.score_learning_rate > 0:
            raise ConfigError("score_learning_rate", f"{self.score_learning_rate} must be > 0")
        if self.lr_drops:
            raise ConfigError("lr_drops", "does not apply: the clients' optimizers restart every round")


class _Context(NamedTuple):
    config: FederatedConfig
    model: object
    n: int
    params0: object  # leaves (slots, ...)
    mask: object
    clients: ClientData  # leaves (slots, clients, size, ...)
    round_keys: jax.Array
    test: tuple


def _server(config: FederatedConfig, model, input_shape, workdir: str, progress: bool):
    """θ0 and the SynFlow mask of every seed slot: computed now, or loaded from ``server.npz``."""
    path = os.path.join(workdir, "server.npz")
    init_keys, mask_keys = stream_keys(config, "init", "mask")
    params_shape = jax.eval_shape(jax.vmap(lambda k: model.init(k)[0]), init_keys)
    if os.path.exists(path):
        ticket = load_ticket(path, like=params_shape)
        return (put_seeded(ticket.params, config.devices, stacked=True),
                put_seeded(ticket.mask, config.devices, stacked=True))
    start = time.perf_counter()
    method = get_method("synflow", rounds=config.synflow_rounds)

    def one_seed(init_key, mask_key):
        params, state = model.init(init_key)
        context = ScoreContext(eval_apply_fn=lambda p, x: model.apply(p, state, x, False)[0], input_shape=input_shape)
        return params, prune_with(method, params, ones_like(params), key=mask_key, context=context,
                                  fraction=1.0 - config.density)

    params0, mask = over_seeds(config, one_seed, (0, 0))(init_keys, mask_keys)
    host_params, host_mask = gather((params0, mask))
    if jax.process_index() == 0:
        save_ticket(path, mask=host_mask, params=host_params, seeds=True,
                    metadata={"what": "θ0 and the server's SynFlow mask, one per seed slot",
                              "seeds": list(seed_slots(config)), "seconds": time.perf_counter() - start})
    if progress:
        kept = np.asarray(jax.vmap(density)(host_mask))
        print(f"server: SynFlow masks at density {kept.mean():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return params0, mask


def _clients(config: FederatedConfig, data) -> ClientData:
    """The clients of every seed slot, padded to one size (leaves ``(slots, clients, size, ...)``)."""
    keys = seed_keys(seed_slots(config), "control")
    split = SPLITS[config.split]
    labels = np.asarray(data.y_train)
    owners = [split(labels, config, key) for key in keys]
    size = max(int(np.bincount(o, minlength=config.num_clients).max()) for o in owners)
    per_seed = [client_data(data.x_train, labels, o, num_clients=config.num_clients, size=size) for o in owners]
    return ClientData(*(np.stack(parts) for parts in zip(*per_seed)))


def _run_arm(context: _Context, name: str) -> dict:
    """One arm for every seed: per-seed curves (seeds first) and the final server state."""
    config, model = context.config, context.model
    method = FEDERATED_METHODS[name]
    rate = getattr(config, LEARNING_RATES[name])
    optimizer = make_optimizer(config.optimizer, rate, momentum=config.momentum, weight_decay=config.weight_decay,
                               masked=False)
    x_test, y_test = context.test
    _, state = model.init(jax.random.key(0))  # empty: models with state are refused

    def one_seed(params0, mask, clients, key, x_test, y_test):
        apply_fn = lambda p, x: model.apply(p, state, x, True)[0]
        update = make_client_update(apply_fn, optimizer, method, batch_size=config.batch_size,
                                    local_epochs=config.local_epochs)

        def evaluate(trainable):
            logits = model.apply(method.weights(params0, mask, trainable), state, x_test, False)[0]
            loss = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y_test[:, None], -1)[:, 0])
            return {"test_loss": loss, "test_accuracy": jnp.mean(jnp.argmax(logits, -1) == y_test)}

        trainable0 = method.init(params0, mask)
        final, rows = run_rounds(make_federated_round(update, method), trainable0, params0, mask, clients, key=key,
                                 num_rounds=config.rounds, evaluate=evaluate)
        first = evaluate(trainable0)
        curves = {k: jnp.concatenate([first[k][None], v]) for k, v in rows["metrics"].items()}
        examples = jnp.sum(clients.weight, axis=1)
        return final, curves, jnp.sum(rows["loss"] * examples, axis=1) / jnp.sum(examples)

    start = time.perf_counter()
    final, curves, client_loss = over_seeds(config, one_seed, (0, 0, 0, 0, None, None))(
        context.params0, context.mask, context.clients, context.round_keys, x_test, y_test)
    final, curves, client_loss = gather((final, curves, client_loss))
    n = context.n
    masks = gather(context.mask)
    bits = [uplink_bits(method, jax.tree.map(lambda m: m[i], masks), num_clients=config.num_clients) for i in range(n)]
    record = {k: np.asarray(v)[:n] for k, v in curves.items()}
    record.update(client_loss=np.asarray(client_loss)[:n], uplink_bits=np.asarray(bits, np.int64),
                  seconds=np.array(time.perf_counter() - start))
    paths, leaves, _ = leaves_with_paths(final)
    record.update({f"final/{path}": np.asarray(leaf)[:n] for path, leaf in zip(paths, leaves)})
    return record


@exclusive("federated")
def run_federated(config: FederatedConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    from lottojax.models import create

    config.check()
    with open_run(root, "federated", config) as workdir:
        data = load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation)
        check_dataset(data)
        model = create(config.model, input_shape=data.input_shape, num_classes=data.num_classes,
                       **model_kwargs(config))
        if jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0))[1]):
            raise ConfigError("model", f"{config.model!r} has model state (BatchNorm statistics), which federated "
                                       "averaging here does not aggregate: choose a model without BatchNorm")
        clients = _clients(config, data)
        params0, mask = _server(config, model, data.input_shape, workdir, progress)
    slots = seed_slots(config)
    (data_keys,) = stream_keys(config, "data")
    test = put_seeded((jnp.asarray(data.x_test), jnp.asarray(data.y_test)), config.devices, stacked=False)
    context = _Context(config, model, len(config.seeds), params0, mask,
                       put_seeded(clients, config.devices, stacked=True), data_keys, test)
    results = {}
    for name in config.arms:
        record, fresh = load_or_run(os.path.join(workdir, "arms", f"{name}.npz"), partial(_run_arm, context, name))
        results[name] = record
        if not fresh:  # run in an earlier call
            continue
        if jax.process_index() == 0:
            rounds = np.arange(config.rounds + 1)  # round 0: before any training
            log_history(workdir, name, {"step": rounds, "test_loss": record["test_loss"],
                                        "test_accuracy": record["test_accuracy"]}, {"seed": config.seeds})
        if progress:
            print(f"{name:>10}: {mean_std(record['test_accuracy'][:, -1], diverged=arm_diverged(record))} "
                  f"test accuracy after {config.rounds} "
                  f"rounds, {record['uplink_bits'][0] / 8e6:.3f} MB uplink per round "
                  f"({float(record['seconds']):.0f} s)", flush=True)
    summary = summarize(config, results, slots)
    if jax.process_index() == 0:
        write_results(workdir, summary, {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()
                                         if not k.startswith("final/")})
        with open(os.path.join(workdir, "table.txt"), "w") as f:
            f.write(federated_table(summary) + "\n")
        plot_federated(summary, os.path.join(workdir, "federated.png"),
                       title=f"HideNseek on {config.dataset} ({config.model}), {config.num_clients} clients "
                             f"({_split_text(config)}), {plural(len(config.seeds), 'seed')}")
    return summary, workdir


def _split_text(config: FederatedConfig) -> str:
    return (f"{config.classes_per_client} classes each" if config.split == "classes"
            else f"Dirichlet α={config.alpha:g}")


def arm_diverged(record: dict) -> np.ndarray:
    """Per seed: did the arm diverge (its clients' training loss or the server model's test
    loss non-finite in any round)?

    Examples:
      >>> arm_diverged({'client_loss': np.array([[0.5, 0.4], [0.6, np.nan]]), 'test_loss': np.ones((2, 3))})
      array([False,  True])
    """
    return diverged_runs(record["client_loss"], record["test_loss"])


def summarize(config: FederatedConfig, results: dict, slots) -> dict:
    """The JSON summary: per arm the final and best test accuracy, the accuracy at
    :data:`TABLE_ROUNDS`, the uplink per round and in all, the curves (mean and std per
    round) and the seconds the arm took. A seed whose arm diverged (:func:`arm_diverged`) is
    NaN in every statistic, left out of the means and curves and counted."""
    out = {"config": dataclasses.asdict(config), "seeds": list(config.seeds), "arms": {}}
    for name, r in results.items():
        accuracy = np.asarray(r["test_accuracy"])
        bits = int(r["uplink_bits"][0])
        diverged = arm_diverged(r)
        kept = lambda k: np.asarray(r[k])[~diverged]
        out["arms"][name] = {
            "test_accuracy": stats(accuracy[:, -1], diverged=diverged),
            "best_test_accuracy": stats(accuracy[:, 1:].max(axis=1), diverged=diverged),
            "at_round": {str(t): stats(accuracy[:, t], diverged=diverged) for t in TABLE_ROUNDS
                         if t < accuracy.shape[1] - 1},
            "uplink_bits_per_round": bits,
            "uplink_bits_total": bits * (accuracy.shape[1] - 1),
            "curve": {"round": list(range(accuracy.shape[1])),
                      **{f"{k}_{f.__name__}": f(kept(k), axis=0).tolist()
                         for k in ("test_accuracy", "test_loss") for f in (np.mean, np.std)},
                      "client_loss_mean": np.mean(kept("client_loss"), axis=0).tolist()},
            "seconds": float(r["seconds"]),
        }
    return out


def federated_table(summary: dict) -> str:
    """Per arm: final test accuracy (%) mean ± std (n, and how many seeds diverged), best
    over rounds, accuracy at :data:`TABLE_ROUNDS`, uplink per round (MB, all clients) and
    relative to dense FedAvg.

    Examples:
      >>> s = lambda m: {'mean': m, 'std': 0.01, 'n': 3}
      >>> summary = {'arms': {'sign-mean': {'test_accuracy': s(0.5), 'best_test_accuracy': s(0.52),
      ...     'at_round': {'10': s(0.3)}, 'uplink_bits_per_round': 8_000_000, 'seconds': 12.0}}}
      >>> print(federated_table(summary))
      arm         final test acc. (%)   best (%)       round 10 (%)    uplink MB/round  vs dense  seconds
      sign-mean   50.00 ± 1.00 (n=3)    52.00 ± 1.00   30.00 ± 1.00              1.000         -       12
    """
    cell = lambda s: "diverged" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    arms = summary["arms"]
    rounds = sorted({t for arm in arms.values() for t in arm["at_round"]}, key=int)
    dense = arms.get("dense", {}).get("uplink_bits_per_round")
    width = max(10, *(len(name) for name in arms)) + 2
    header = f"{'arm':<{width}}{'final test acc. (%)':<22}{'best (%)':<15}"
    header += "".join(f"{f'round {t} (%)':<15}" for t in rounds)
    lines = [header + f"{'uplink MB/round':>16}{'vs dense':>10}{'seconds':>9}"]
    for name, arm in arms.items():
        final = arm["test_accuracy"]
        final_text = f"{cell(final)} (n={final['n']}" + (f", {final['diverged']} diverged)" if final.get("diverged")
                                                          else ")")
        row = f"{name:<{width}}{final_text:<22}{cell(arm['best_test_accuracy']):<15}"
        row += "".join(f"{cell(arm['at_round'][t]) if t in arm['at_round'] else '-':<15}" for t in rounds)
        ratio = f"{arm['uplink_bits_per_round'] / dense:.4f}" if dense else "-"
        row += f"{arm['uplink_bits_per_round'] / 8e6:16.3f}{ratio:>10}{arm['seconds']:9.0f}"
        lines.append(row)
    return "\n".join(lines)


def plot_federated(summary: dict, path: str, *, title: str = "") -> None:
    """Test accuracy vs round, and vs cumulative uplink (MB, log scale), per arm: mean ± std."""
    fig, (by_round, by_bits) = figure(2, width=6.0, height=4.2)
    for i, (name, arm) in enumerate(summary["arms"].items()):
        curve = arm["curve"]
        rounds = np.asarray(curve["round"])
        mean, std = 100 * np.asarray(curve["test_accuracy_mean"]), 100 * np.asarray(curve["test_accuracy_std"])
        megabytes = rounds * arm["uplink_bits_per_round"] / 8e6
        for ax, part in ((by_round, slice(None)), (by_bits, slice(1, None))):  # round 0 sent nothing
            x = (rounds if ax is by_round else megabytes)[part]
            ax.plot(x, mean[part], color=f"C{i}", linewidth=1.3, label=name)
            ax.fill_between(x, (mean - std)[part], (mean + std)[part], color=f"C{i}", alpha=0.15, linewidth=0)
    by_round.set_xlabel("round")
    by_bits.set_xlabel("cumulative uplink, all clients (MB)")
    by_bits.set_xscale("log")
    for ax in (by_round, by_bits):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    by_round.legend(fontsize=8, loc="lower right")
    save(fig, path, title=title)
