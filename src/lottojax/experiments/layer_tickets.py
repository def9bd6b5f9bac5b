"""Layer tickets (Jordao et al., "When layers play the lottery"): remove residual blocks at
initialisation, train the shallower ResNet.

:func:`run_layer_tickets` is what ``python experiments/layer_tickets.py`` runs; a notebook
can call it the same way. For every seed it

1. initialises the ResNet (``stage_sizes``, ``width``; BatchNorm, He-normal kernels) from
   the seed's ``init`` key and scores its blocks with every scorer of ``scorers`` (the
   registry :data:`SCORERS`), all seeds of a scorer in one program (``over_seeds``);
2. for every ``count`` of ``counts`` removes the ``count`` lowest-scoring removable blocks
   (:func:`lottojax.layer_tickets.remove_lowest_blocks`: never a block next to
   downsampling) and trains the shallower net from the kept blocks' initial weights.

Training is one unit per *(seed, removed blocks)*: scorers that remove the same blocks of a
seed share one training (the same initial weights and the same minibatch order, the seed's
``data`` key), and the dense net (0 blocks removed) is trained once per seed. Units run one
seed at a time, since different seeds may remove different blocks (different
architectures); each architecture (``stage_sizes``) is compiled once. Each unit is saved
under ``units/`` when it finishes (:func:`~lottojax.experiments.store.load_or_run`), so a
killed run resumes after the last finished unit.

Per configuration (scorer × blocks removed) the results give the test accuracy after
``num_steps`` steps (mean ± std over seeds; a seed whose training or validation loss
became non-finite is NaN and left out), the parameters, the forward FLOPs per example
(:func:`lottojax.layer_tickets.traced_flops` of the built net: convolutions and the
classifier) and the measured time of one training step of each seed's architecture
(:func:`lottojax.timing.interleaved`: every distinct architecture timed in turn, median of
``timing_repeats`` after a warm-up, so load from other processes falls on all alike).

The default run fits a 2-core CPU: Fashion-MNIST average-pooled to 14×14 (``downsample``),
ResNet (3, 3, 3) at 16 base channels, Adam 1.2e-3, batch 32, 300 steps; see
``docs/guides/layer-tickets.md``.

It writes into ``<root>/layer_tickets-<config hash>/``: ``config.json``, ``units/`` (one
``.npz`` per trained unit), ``step_times-<hash>.json``, ``results.json``, ``results.npz``,
``layer_tickets.png`` and ``table.txt``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import zlib
from types import MappingProxyType
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import read_json, write_json
from lottojax.data import Dataset
from lottojax.experiments.base import (
    ConfigError,
    ExperimentConfig,
    check_dataset,
    learning_rate_schedule,
    load_dataset,
    make_optimizer,
    option,
    over_seeds,
    override,
    stream_keys,
)
from lottojax.experiments.metrics import log_history
from lottojax.experiments.plots import dense_line, figure, save, spread_note
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, open_run, stats, write_results
from lottojax.layer_tickets import (
    block_scores,
    random_block_scores,
    removable_blocks,
    remove_lowest_blocks,
    traced_flops,
)
from lottojax.methods import ScoreContext, get_method
from lottojax.models import ResNet, from_linen
from lottojax.seeds import gather
from lottojax.timing import interleaved
from lottojax.train import History, TrainState, make_trainer

BlockScoreFn = Callable[..., dict]


class BlockScorer(NamedTuple):
    """How to score the blocks: ``scores(params, *, key, context, config) -> {block: score}``
    (jittable; ``context`` a :class:`lottojax.methods.ScoreContext`); lowest goes first."""

    scores: BlockScoreFn
    help: str


def summed(method: str, *, absolute: bool = False) -> BlockScoreFn:
    """Block scores that sum a registered pruning method's per-weight scores over each
    block's kernels (:func:`lottojax.layer_tickets.block_scores`), of their absolute values
    with ``absolute``. The method's hyperparameters come from the config
    (``snip_batch_size``; ``grasp_per_class``, ``grasp_temperature``).

    Examples:
      >>> params = {'stage0_block0': {'conv0': {'kernel': -jnp.ones((3, 3, 2, 2))}}}
      >>> score = summed('magnitude')
      >>> float(score(params, key=jax.random.key(0), context=ScoreContext(), config=LayerTicketConfig())['stage0_block0'])
      36.0
    """
    def scores(params, *, key, context, config):
        hparams = {"snip": {"batch_size": config.snip_batch_size},
                   "grasp": {"per_class": config.grasp_per_class, "temperature": config.grasp_temperature}}
        weights = get_method(method, **hparams.get(method, {})).scores(params, key=key, context=context, prunable=None)
        return block_scores(jax.tree.map(jnp.abs, weights) if absolute else weights)

    return scores


def _random(params, *, key, context, config):
    del context, config
    return random_block_scores(params, key=key)


#: The block scorers, by name. A new scorer is one line here.
SCORERS = MappingProxyType({
    "snip": BlockScorer(summed("snip"), "SNIP |g ⊙ θ| on snip_batch_size examples, summed per block"),
    "grasp-signed": BlockScorer(summed("grasp"), "GraSP θ ⊙ Hg (higher = keep), summed with its sign: removes the "
                                                 "blocks whose removal the paper's S = −θ ⊙ Hg favours most"),
    "grasp-abs": BlockScorer(summed("grasp", absolute=True), "|θ ⊙ Hg| summed: removes the blocks that change the "
                                                             "gradient flow least in either direction"),
    "magnitude": BlockScorer(summed("magnitude"), "|θ| summed per block (data-free)"),
    "random": BlockScorer(_random, "one uniform draw per block: every removable block equally likely"),
})


@dataclasses.dataclass(frozen=True)
class LayerTicketConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the CPU reproduction of §7 (see the
    module docstring)."""

    model: str = override(ExperimentConfig, "model", "resnet20")
    dataset: str = override(ExperimentConfig, "dataset", "fashion-mnist")
    validation: int = override(ExperimentConfig, "validation", 1000)
    batch_size: int = override(ExperimentConfig, "batch_size", 32)
    num_steps: int = override(ExperimentConfig, "num_steps", 300)
    eval_every: int = override(ExperimentConfig, "eval_every", 300)
    seeds: tuple[int, ...] = override(ExperimentConfig, "seeds", (0, 1, 2))
    stage_sizes: tuple[int, ...] = option((3, 3, 3), "blocks per stage of the dense ResNet ((3, 3, 3): ResNet-20)")
    width: int = option(1, "channel multiplier: 16 * width channels in the first stage")
    pre_activation: bool = option(False, "pre-activation blocks (PreResNet)")
    downsample: int = option(2, "average-pool the images by this factor (2: 28x28 -> 14x14), 1 keeps them")
    scorers: tuple[str, ...] = option(tuple(SCORERS), "block scorers (lottojax.experiments.layer_tickets.SCORERS)",
                                      choices=tuple(SCORERS), extends=True)
    counts: tuple[int, ...] = option((1, 2, 3, 4), "numbers of blocks removed (0, the dense net, is always run)",
                                     extends=True)
    snip_batch_size: int = option(100, "SNIP: examples in its one minibatch")
    grasp_per_class: int = option(10, "GraSP: examples per class in its class-balanced sample")
    grasp_temperature: float = option(200.0, "GraSP: the logits' temperature")
    timing_repeats: int = option(10, "timed training steps per architecture (after one warm-up)")

    def check(self) -> None:
        super().check()
        if self.model != "resnet20":
            raise ConfigError("model", f"{self.model!r}: layer tickets remove residual blocks; use 'resnet20' "
                                       "(its depth is --stage-sizes)")
        if not self.stage_sizes or any(s < 1 for s in self.stage_sizes):
            raise ConfigError("stage_sizes", f"{self.stage_sizes}: give at least one stage, each >= 1 blocks")
        for name in ("width", "downsample", "snip_batch_size", "grasp_per_class", "timing_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not self.grasp_temperature > 0:
            raise ConfigError("grasp_temperature", f"{self.grasp_temperature} must be > 0")
        if not self.scorers or len(set(self.scorers)) != len(self.scorers):
            raise ConfigError("scorers", f"{self.scorers}: give distinct scorers")
        removable = sum(self.stage_sizes) - (len(self.stage_sizes) - 1)
        if not self.counts or len(set(self.counts)) != len(self.counts) or not all(
                1 <= c <= removable for c in self.counts):
            raise ConfigError("counts", f"{self.counts}: give distinct counts in [1, {removable}] (the blocks not "
                                        "next to downsampling)")


def downsampled(data: Dataset, factor: int) -> Dataset:
    """Every image split average-pooled by ``factor`` (height and width must divide).

    Examples:
      >>> x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1); y = np.zeros(1, np.int32)
      >>> downsampled(Dataset(x, y, x, y, x, y), 2).x_train[0, ..., 0]
      array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    if factor == 1:
        return data
    height, width = data.x_train.shape[1:3]
    if height % factor or width % factor:
        raise ConfigError("downsample", f"{factor} does not divide the {height}x{width} images")

    def pool(x):
        x = np.asarray(x)
        n, h, w, c = x.shape
        return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4)).astype(x.dtype)

    return data._replace(**{k: pool(getattr(data, k)) for k in ("x_train", "x_val", "x_test")})


def removed_tag(removed) -> str:
    """A file-name tag of a set of removed blocks: ``'dense'`` for none.

    Examples:
      >>> removed_tag(()), removed_tag(('stage0_block1', 'stage2_block2'))
      ('dense', 's0b1-s2b2')
    """
    return "-".join(name.replace("stage", "s").replace("_block", "b") for name in removed) or "dense"


def sizes_tag(stage_sizes) -> str:
    """``(3, 2, 3)`` -> ``'3-2-3'``."""
    return "-".join(map(str, stage_sizes))


class _Architectures:
    """One model, FLOP count and compiled training of each ``stage_sizes``, built on demand."""

    def __init__(self, config: LayerTicketConfig, data: Dataset):
        self.config, self.data = config, data
        schedule = learning_rate_schedule(config, config.num_steps)
        self.optimizer = make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                        weight_decay=config.weight_decay)
        self._built: dict = {}

    def model(self, stage_sizes):
        return self._get(stage_sizes)[0]

    def train(self, stage_sizes):
        return self._get(stage_sizes)[1]

    def step(self, stage_sizes):
        return self._get(stage_sizes)[2]

    def _get(self, stage_sizes):
        stage_sizes = tuple(stage_sizes)
        if stage_sizes not in self._built:
            config = self.config
            model = from_linen(ResNet(stage_sizes=stage_sizes, width=config.width,
                                      pre_activation=config.pre_activation, num_classes=self.data.num_classes),
                               input_shape=self.data.input_shape)
            trainer = make_trainer(model, self.optimizer, batch_size=config.batch_size, eval_every=config.eval_every)
            self._built[stage_sizes] = (model, jax.jit(trainer.train, static_argnames="num_steps"),
                                        jax.jit(trainer.step))
        return self._built[stage_sizes]

    def counts(self, stage_sizes) -> tuple[int, float]:
        """(parameters, forward FLOPs per example) of the architecture."""
        model = self.model(stage_sizes)
        params, state = jax.eval_shape(model.init, jax.random.key(0))
        x = jnp.zeros((1, *self.data.input_shape), jnp.float32)
        flops = traced_flops(lambda p, s, x: model.apply(p, s, x, False)[0], params, state, x)
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), flops


def _score_blocks(config: LayerTicketConfig, model, data: Dataset, params, model_state, control_keys) -> dict:
    """``{scorer: {block: (seeds,) scores}}`` for every scorer, every seed of a scorer in one program."""
    n, num_classes = len(config.seeds), data.num_classes
    out = {}
    for name in config.scorers:
        scorer = SCORERS[name].scores

        def one_seed(params, model_state, key, x, y, scorer=scorer):
            context = ScoreContext(apply_fn=lambda p, xx: model.apply(p, model_state, xx, True)[0], x=x, y=y,
                                   num_classes=num_classes)
            return scorer(params, key=key, context=context, config=config)

        keys = jax.vmap(jax.random.fold_in, (0, None))(control_keys, zlib.crc32(name.encode()))
        totals = over_seeds(config, one_seed, (0, 0, 0, None, None))(params, model_state, keys, data.x_train,
                                                                      data.y_train)
        out[name] = {block: np.asarray(v)[:n] for block, v in gather(totals).items()}
    return out


def _train_unit(architectures: _Architectures, ticket, data_key, data) -> dict:
    """Trains one seed's shallower net; the unit's record (history rows and seconds)."""
    start = time.perf_counter()
    optimizer = architectures.optimizer
    state = TrainState(ticket.params, ticket.model_state, optimizer.init(ticket.params), jnp.zeros((), jnp.int32))
    state, history = architectures.train(ticket.stage_sizes)(state, data, data_key, start=0,
                                                             num_steps=architectures.config.num_steps)
    record = {k: np.asarray(v) for k, v in history._asdict().items()}
    record["seconds"] = np.array(time.perf_counter() - start)
    return record


def _step_times(architectures: _Architectures, all_sizes, data, workdir: str, progress: bool) -> dict:
    """Median wall seconds of one training step per architecture (``sizes_tag`` -> timing dict),
    all architectures timed interleaved; saved once per set of architectures."""
    config = architectures.config
    tags = sorted({sizes_tag(s) for s in all_sizes})
    digest = hashlib.sha1(" ".join(tags).encode()).hexdigest()[:8]
    x, y = data.x_train[:config.batch_size], data.y_train[:config.batch_size]

    def compute():
        fns = {}
        for sizes in sorted(set(map(tuple, all_sizes))):
            params, state = architectures.model(sizes).init(jax.random.key(0))
            train_state = TrainState(params, state, architectures.optimizer.init(params), jnp.zeros((), jnp.int32))
            step = architectures.step(sizes)
            fns[sizes_tag(sizes)] = lambda step=step, s=train_state: step(s, x, y)
        timings = interleaved(fns, repeats=config.timing_repeats, warmup=1)
        if progress:
            print("step times: " + ", ".join(f"{k} {1000 * t.median:.1f} ms" for k, t in timings.items()), flush=True)
        return {k: t.as_dict() for k, t in timings.items()}

    return load_or_run(os.path.join(workdir, f"step_times-{digest}.json"), compute, save=write_json,
                       load=read_json)[0]


@exclusive("layer_tickets")
def run_layer_tickets(config: LayerTicketConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "layer_tickets", config) as workdir:
        data = load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation)
        data = downsampled(data, config.downsample)
        check_dataset(data)
        data = jax.device_put(data)
    architectures = _Architectures(config, data)
    dense_model = architectures.model(config.stage_sizes)
    init_keys, control_keys, data_keys = stream_keys(config, "init", "control", "data")
    params, model_state = over_seeds(config, dense_model.init, (0,))(init_keys)
    if not removable_blocks(jax.tree.map(lambda p: p[0], params)):
        raise ConfigError("stage_sizes", f"{config.stage_sizes} leaves no removable block")
    totals = _score_blocks(config, dense_model, data, params, model_state, control_keys)
    host_params, host_state = gather((params, model_state))
    seed_of = lambda tree, i: jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[i]), tree)
    units: dict = {}  # (seed index, removed) -> record
    choices: dict = {}  # (scorer, count) -> [(removed, stage_sizes)] per seed
    for i, seed in enumerate(config.seeds):
        seed_params, seed_state = seed_of(host_params, i), seed_of(host_state, i)
        unscored = {block: 0.0 for block in totals[config.scorers[0]]}  # the dense net: nothing removed
        plan = [(None, 0, unscored)] + [(name, count, {b: v[i] for b, v in totals[name].items()})
                                        for name in config.scorers for count in config.counts]
        for name, count, scores in plan:
            ticket = remove_lowest_blocks(seed_params, seed_state, scores, count=count)
            if name is not None:
                choices.setdefault((name, count), []).append((ticket.removed, ticket.stage_sizes))
            key = (i, ticket.removed)
            if key in units:
                continue
            unit = f"seed{seed}-{removed_tag(ticket.removed)}"
            path = os.path.join(workdir, "units", f"{unit}.npz")
            record, fresh = load_or_run(path, lambda t=ticket, i=i: _train_unit(
                architectures, t, data_keys[i], data) | {"stage_sizes": np.asarray(t.stage_sizes)})
            units[key] = record
            if fresh and jax.process_index() == 0:
                log_history(workdir, unit, History(*(np.asarray(record[f])[None] for f in History._fields)),
                            {"seed": (seed,)})
            if fresh and progress:
                accuracy = float(record["test_accuracy"][-1])
                print(f"seed {seed} {removed_tag(ticket.removed):>24} {sizes_tag(ticket.stage_sizes):>6}: "
                      + (f"{100 * accuracy:.2f}% test accuracy" if np.isfinite(accuracy) else "diverged")
                      + f" ({float(record['seconds']):.0f} s)", flush=True)
    all_sizes = {tuple(int(s) for s in r["stage_sizes"]) for r in units.values()}
    step_times = _step_times(architectures, all_sizes, data, workdir, progress)
    counts = {sizes_tag(s): architectures.counts(s) for s in all_sizes}
    summary = summarize(config, units, choices, counts, step_times)
    if jax.process_index() == 0:
        arrays = {f"units/{config.seeds[i]}/{removed_tag(removed)}/{k}": v for (i, removed), r in units.items()
                  for k, v in r.items()}
        arrays |= {f"block_scores/{name}/{block}": v for name, t in totals.items() for block, v in t.items()}
        write_results(workdir, summary, arrays)
        with open(os.path.join(workdir, "table.txt"), "w") as f:
            f.write(layer_ticket_table(summary) + "\n")
        plot_layer_tickets(summary, os.path.join(workdir, "layer_tickets.png"),
                           title=f"Layer tickets: ResNet {sizes_tag(config.stage_sizes)} (width {config.width}) on "
                                 f"{config.dataset} /{config.downsample}, {config.num_steps} steps")
    return summary, workdir


def _configuration(config, records: list, architectures: list, counts: dict, step_times: dict) -> dict:
    """The summary entry of one configuration from its per-seed unit records and architectures."""
    accuracy = np.array([r["test_accuracy"][-1] for r in records])
    diverged = diverged_runs(np.stack([r["train_loss"] for r in records]),
                             np.stack([r["val_loss"] for r in records]))
    tags = [sizes_tag(s) for _, s in architectures]
    return {
        "test_accuracy": stats(accuracy, diverged=diverged),
        "removed": [list(removed) for removed, _ in architectures],
        "stage_sizes": [list(s) for _, s in architectures],
        "params": stats([counts[t][0] for t in tags]),
        "flops": stats([counts[t][1] for t in tags]),
        "step_seconds": stats([step_times[t]["median_s"] for t in tags]),
    }


def summarize(config: LayerTicketConfig, units: dict, choices: dict, counts: dict, step_times: dict) -> dict:
    """The JSON summary: the dense net, then per scorer and count of removed blocks the
    test accuracy, which blocks each seed removed, parameters, FLOPs and step time (each
    mean, std, n and per seed); and per architecture its counts and step timing."""
    n = len(config.seeds)
    dense = [(i, ()) for i in range(n)]
    dense_sizes = [((), tuple(config.stage_sizes))] * n
    out = {"config": dataclasses.asdict(config),
           "dense": _configuration(config, [units[k] for k in dense], dense_sizes, counts, step_times),
           "scorers": {},
           "architectures": {tag: {"params": counts[tag][0], "flops": counts[tag][1], "step_time": step_times[tag]}
                             for tag in sorted(counts)}}
    for name in config.scorers:
        entry = {}
        for count in config.counts:
            picked = choices[(name, count)]
            records = [units[(i, removed)] for i, (removed, _) in enumerate(picked)]
            entry[str(count)] = _configuration(config, records, picked, counts, step_times)
        out["scorers"][name] = entry
    return out


def layer_ticket_table(summary: dict) -> str:
    """Per scorer and number of removed blocks: test accuracy (%) mean ± std (n), mean
    parameters, mean forward MFLOPs per example, mean step time (ms), how many distinct
    block sets the seeds removed, and how many seeds diverged (left out of the accuracy).

    Examples:
      >>> s = lambda m, sd=0.0: {'mean': m, 'std': sd, 'n': 2}
      >>> row = lambda a, p, f, t, removed: {'test_accuracy': s(a, 0.01), 'params': s(p), 'flops': s(f),
      ...                                    'step_seconds': s(t), 'removed': removed}
      >>> summary = {'dense': row(0.85, 272000, 17e6, 0.09, [[], []]),
      ...            'scorers': {'snip': {'1': row(0.84, 263000, 15e6, 0.08, [['stage0_block0']] * 2)}}}
      >>> print(layer_ticket_table(summary))
      scorer        removed    test acc. (%)       params    MFLOPs  step ms  block sets
      dense               0  85.00 ± 1.00 (n=2)    272.0k    17.00     90.0           1
      snip                1  84.00 ± 1.00 (n=2)    263.0k    15.00     80.0           1
    """
    def line(name, count, entry):
        a = entry["test_accuracy"]
        accuracy = "diverged" if a["mean"] is None else f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f} (n={a['n']})"
        sets = len({tuple(r) for r in entry["removed"]})
        diverged = f"  ({a['diverged']} diverged)" if a.get("diverged") else ""
        return (f"{name:<12}{count:>8}  {accuracy:<18}{entry['params']['mean'] / 1e3:>9.1f}k"
                f"{entry['flops']['mean'] / 1e6:>9.2f}{1000 * entry['step_seconds']['mean']:>9.1f}{sets:>12}"
                f"{diverged}")

    lines = [f"{'scorer':<12}{'removed':>8}  {'test acc. (%)':<18}{'params':>10}{'MFLOPs':>9}{'step ms':>9}"
             f"{'block sets':>12}", line("dense", 0, summary["dense"])]
    for name, entry in summary["scorers"].items():
        lines += [line(name, int(count), e) for count, e in entry.items()]
    return "\n".join(lines)


def plot_layer_tickets(summary: dict, path: str, *, title: str = "") -> None:
    """Two panels: test accuracy vs blocks removed per scorer (mean ± std over seeds, the
    dense net dashed); training-step time vs blocks removed per scorer (mean over the
    seeds' architectures; the dense net at 0)."""
    fig, (acc_ax, time_ax) = figure(2, width=5.5, height=4.0)
    dense = summary["dense"]
    for i, (name, entry) in enumerate(summary["scorers"].items()):
        counts = [0] + [int(c) for c in entry]
        rows = [dense] + list(entry.values())
        mean = np.array([np.nan if r["test_accuracy"]["mean"] is None else 100 * r["test_accuracy"]["mean"]
                         for r in rows])
        std = np.array([0.0 if r["test_accuracy"]["std"] is None else 100 * r["test_accuracy"]["std"] for r in rows])
        shift = (i - (len(summary["scorers"]) - 1) / 2) * 0.06
        acc_ax.errorbar(np.array(counts) + shift, mean, yerr=std, marker="o", markersize=4, capsize=2, label=name,
                        color=f"C{i}", linewidth=1.2)
        time_ax.plot(np.array(counts) + shift, [1000 * r["step_seconds"]["mean"] for r in rows], marker="o",
                     markersize=4, label=name, color=f"C{i}", linewidth=1.2)
    dense_line(acc_ax, 100 * dense["test_accuracy"]["mean"])
    acc_ax.set_ylabel("test accuracy (%)")
    time_ax.set_ylabel("training step (ms, median)")
    for ax in (acc_ax, time_ax):
        ax.set_xticks([0] + [int(c) for c in next(iter(summary["scorers"].values()), {})])
        ax.set_xlabel("residual blocks removed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path, title=title, note=spread_note(dense["test_accuracy"]["n"]))
