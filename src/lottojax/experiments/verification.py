"""Lottery verification (Chen et al., NeurIPS 2021): ownership signatures in a ticket's topology.

:func:`run_verification` is what ``python experiments/verification.py`` runs; a notebook can
call it the same way. For every seed (``seed_strategy`` over ``devices``) it

1. finds a ticket by IMP (:func:`lottojax.imp.run_imp`): ``rounds`` rounds of global
   magnitude pruning of ``prune_rate`` of the remaining weights of every kernel except the
   layers named in ``keep_dense`` (the first layer and the classifier, as the reference
   keeps its first conv and fc dense), rewinding to step ``rewind_step``;
2. trains the ticket from ``θ_k`` (steps ``[k, T)``, the seed's data order): **before**,
   the unsigned ticket (the same run as IMP's last level);
3. writes the signature (a QR code of ``signature_text``, or a random bit matrix) into the
   connectivity map of the prunable layer and window that agree with it most
   (:func:`lottojax.verification.locate_signature`, :func:`~lottojax.verification.embed_signature`
   with ``rebalance``; the scores are the trained magnitudes of kept weights and ``|θ_k|``
   of pruned ones), and retrains it from ``θ_k`` with the mask fixed: **signed**;
4. trains the unsigned ticket with ``trigger_size`` noise inputs with fixed random labels,
   ``trigger_per_batch`` of them appended to every batch: **trigger** (black box);
5. attacks both (the registry :data:`ATTACKS`: fine-tuning ``finetune_steps`` steps at
   ``finetune_learning_rate`` with a fresh optimizer and another data order, mask fixed;
   10/20/30% extra global magnitude pruning; 10/20/30% random pruning) and measures test
   accuracy, the bit error of the extracted window (data cells; and the reference's
   diluted all-cells figure), whether OpenCV decodes it (raw, and with the fixed QR
   patterns pasted back as the reference does), and the trigger accuracy;
6. as the ambiguity control, looks for the signature in an **independent** ticket (the
   ticket of the next seed, cyclically: another θ0 and data order, never signed): its best
   window's bit error, and the trigger accuracy of that seed's unsigned model on this
   seed's trigger set.

It writes into ``<root>/verification-<config hash>/``: ``config.json``, ``imp/`` (IMP's
checkpoints: a killed run resumes at the last finished level), ``models/<name>.npz`` (the
trained models of every seed, :data:`MODELS`, saved as each finishes; the fine-tuned ones
only when an attack fine-tunes), ``results.json``, ``results.npz``,
``table.txt`` and ``verification.png`` (per seed: the connectivity map with the window, the
code, the window after retraining, after 20% extra pruning, and the independent ticket's
best window).

Divergence: a model whose test loss is NaN or inf (and an IMP level whose training or
validation loss became so) diverged; its seed is NaN in that model's accuracies and in
what a verifier reads from it (the independent control: when the next seed's ticket
diverged), left out of every mean and decode count, and counted (the table says
``(k diverged)``, ``results.json`` lists it).
"""
from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from types import MappingProxyType
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import load_arrays, save_arrays
from lottojax.experiments.base import (
    ConfigError,
    ExperimentConfig,
    build,
    make_optimizer,
    option,
    over_seeds,
    override,
    put_seed_slots,
    stream_keys,
)
from lottojax.experiments.plots import figure, save
from lottojax.experiments.store import diverged_runs, exclusive, load_or_run, open_run, stats, write_results
from lottojax.imp import run_imp
from lottojax.masks import apply_mask, leaves_with_paths
from lottojax.optim import set_mask
from lottojax.prune import prune_global
from lottojax.scores import magnitude, random_scores
from lottojax.seeds import gather, put_seeded
from lottojax.train import TrainState, make_trainer, minibatch_scan
from lottojax.verification import (
    REBALANCE,
    Placement,
    Signature,
    TriggerSet,
    bit_error,
    bit_signature,
    connectivity,
    decode_qr,
    embed_signature,
    extract_signature,
    locate_signature,
    qr_signature,
    trigger_set,
    with_fixed_cells,
    with_trigger,
)

#: Fold-in constants of the seed's key streams: the trigger set (``control``), the
#: fine-tuning attacker's data order and the random-pruning attack (``data``/``control``).
TRIGGER_KEY, FINETUNE_ORDER, RANDOM_PRUNING = 1_000_003, 1_000_033, 1_000_037


class Attack(NamedTuple):
    """One attack on a trained model: fine-tune it first (mask fixed), then prune
    ``fraction`` of its remaining prunable weights by ``scores(params, key)`` (lowest go,
    one global threshold); ``scores=None`` prunes nothing."""

    finetune: bool
    fraction: float
    scores: Optional[Callable]
    help: str


_magnitude = lambda params, key: magnitude(params)
_random = lambda params, key: random_scores(params, key=key)

#: The attacks, by name. A new attack is one line here.
ATTACKS = MappingProxyType({
    "none": Attack(False, 0.0, None, "the trained model as it is"),
    "finetune": Attack(True, 0.0, None, "fine-tuned, mask fixed"),
    "prune10": Attack(False, 0.1, _magnitude, "10% extra global magnitude pruning"),
    "prune20": Attack(False, 0.2, _magnitude, "20% extra global magnitude pruning"),
    "prune30": Attack(False, 0.3, _magnitude, "30% extra global magnitude pruning"),
    "random10": Attack(False, 0.1, _random, "10% random pruning"),
    "random20": Attack(False, 0.2, _random, "20% random pruning"),
    "random30": Attack(False, 0.3, _random, "30% random pruning"),
})

#: The trained models of every seed: ``before`` (unsigned ticket), ``signed``, ``trigger``,
#: and the fine-tuned ``signed`` and ``trigger`` models of the attack.
MODELS = ("before", "signed", "trigger", "signed-finetuned", "trigger-finetuned")


@dataclasses.dataclass(frozen=True)
class VerificationConfig(ExperimentConfig):
    """Everything that defines a run; the defaults are the MNIST-1D reproduction of §5.

    The CNN1D widened to 48 channels (its middle convolutions are 48 x 48 connectivity maps,
    room for a 29 x 29 QR code at 400 offsets) with Adam 1.2e-3, batch 60, 3000 steps; IMP
    10 rounds of 20% (10.7% of the pruned kernels left), rewinding to step 200.
    """

    model: str = override(ExperimentConfig, "model", "cnn1d")
    widths: tuple[int, ...] = override(ExperimentConfig, "widths", (48, 48, 48))
    seeds: tuple[int, ...] = override(ExperimentConfig, "seeds", (0, 1, 2))
    rounds: int = option(10, "IMP rounds")
    prune_rate: float = option(0.2, "fraction of the remaining prunable weights pruned per IMP round (global)")
    rewind_step: int = option(200, "rewind the ticket to its weights after this many steps")
    keep_dense: tuple[str, ...] = option(("conv0", "output"), "layers never pruned (the first and the classifier)")
    signature: str = option("qr", "a QR code of --signature-text (needs the verification extra) or a random "
                                  "29 x 29 bit matrix", choices=("qr", "bits"))
    signature_text: str = option("lottojax", "the text the QR code encodes")
    qr_version: int = option(3, "QR code version (3: 29 x 29 modules); error correction H")
    embed_cells: str = option("all", "cells written into the mask: every cell (a raw window decodes) or only the "
                                     "data modules (the reference)", choices=("all", "data"))
    rebalance: str = option("outside", "how the kept count is restored: outside the window (the paper), the "
                                       "reference's in-window rule, or not", choices=REBALANCE)
    attacks: tuple[str, ...] = option(tuple(ATTACKS), "attacks (lottojax.experiments.verification.ATTACKS)",
                                      choices=tuple(ATTACKS))
    finetune_steps: int = option(1000, "fine-tuning attack: steps")
    finetune_learning_rate: float = option(1.2e-4, "fine-tuning attack: learning rate (a fresh optimizer of "
                                                   "--optimizer)")
    trigger_size: int = option(100, "trigger set size (noise inputs with fixed random labels)")
    trigger_per_batch: int = option(1, "trigger examples appended to every training batch")

    def check(self) -> None:
        super().check()
        if len(self.seeds) < 2:
            raise ConfigError("seeds", "give at least 2 seeds: each seed's independent ticket is the next seed's")
        if self.rounds < 1:
            raise ConfigError("rounds", f"{self.rounds} must be >= 1")
        if not 0 < self.prune_rate < 1:
            raise ConfigError("prune_rate", f"{self.prune_rate} must be in (0, 1)")
        if not 0 <= self.rewind_step < self.num_steps:
            raise ConfigError("rewind_step", f"{self.rewind_step} must be in [0, num_steps={self.num_steps})")
        for name in ("finetune_steps", "trigger_size", "trigger_per_batch", "qr_version"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        if not self.finetune_learning_rate > 0:
            raise ConfigError("finetune_learning_rate", f"{self.finetune_learning_rate} must be > 0")
        if not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise ConfigError("attacks", f"{self.attacks}: give distinct attacks")

    def prunable(self, path: str, leaf) -> bool:
        """The IMP prunable spec: every kernel outside ``keep_dense``."""
        return jnp.ndim(leaf) >= 2 and path.split("/")[0] not in self.keep_dense


def make_signature(config: VerificationConfig) -> Signature:
    """The QR code of ``signature_text`` (needs the verification extra), or a random bit
    matrix of the same size drawn from a fixed key.

    Examples:
      >>> make_signature(VerificationConfig(signature='bits')).code.shape
      (29, 29)
    """
    if config.signature == "qr":
        return qr_signature(config.signature_text, version=config.qr_version, error="H")
    size = 17 + 4 * config.qr_version
    bits = np.asarray(jax.random.bernoulli(jax.random.key(config.qr_version), 0.5, (size * size,)))
    return bit_signature(bits.astype(int), width=size)


def _seed(tree, i: int):
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


class _Run(NamedTuple):
    config: VerificationConfig
    setup: object
    signature: Signature
    workdir: str
    progress: bool


def _train_program(run: _Run, *, trigger: bool, finetune: bool):
    """Trains every seed from the given states for ``T - k`` steps (or fine-tunes for
    ``finetune_steps`` with a fresh optimizer and the attacker's data order), the triggers
    mixed in when ``trigger``; returns the final params and model state."""
    config, setup = run.config, run.setup
    if finetune:
        optimizer = make_optimizer(config.optimizer, config.finetune_learning_rate, momentum=config.momentum,
                                   weight_decay=config.weight_decay)
        trainer = make_trainer(setup.model, optimizer, batch_size=config.batch_size, eval_every=config.eval_every)
    else:
        trainer = setup.trainer
    steps = config.finetune_steps if finetune else config.num_steps - config.rewind_step

    def one_seed(state, mask, trigger_x, trigger_y, data_key, data):
        if finetune:  # the attacker's own optimizer, from step 0, on another data order
            params = apply_mask(state.params, mask)
            state = TrainState(params, state.model_state, set_mask(optimizer.init(params), mask), jnp.int32(0))
            data_key, start = jax.random.fold_in(data_key, FINETUNE_ORDER), 0
        else:
            state = state._replace(params=apply_mask(state.params, mask), opt_state=set_mask(state.opt_state, mask))
            start = config.rewind_step
        step = trainer.step
        if trigger:
            step = with_trigger(step, TriggerSet(trigger_x, trigger_y), per_batch=config.trigger_per_batch)
        state, _ = minibatch_scan(step, state, data, data_key, start, steps, batch_size=config.batch_size)
        return state.params, state.model_state

    return over_seeds(config, one_seed, (0, 0, 0, 0, 0, None))


def _trained(run: _Run, name: str, program, *args) -> tuple:
    """Model ``name`` of every seed: loaded from ``models/<name>.npz``, or trained and saved."""
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(program, *args))
    start = time.perf_counter()
    out, fresh = load_or_run(os.path.join(run.workdir, "models", f"{name}.npz"), lambda: gather(program(*args)),
                             save=save_arrays, load=lambda path: load_arrays(path, template))
    if fresh and run.progress:
        print(f"trained {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def _embed_all(run: _Run, masks, scores) -> tuple:
    """Locates and embeds the signature in every seed's mask (on the host); returns the
    signed masks (stacked), the placements and per-seed records."""
    sig, config = run.signature, run.config
    cells = sig.data if config.embed_cells == "data" else None
    signed, placements, records = [], [], []
    for i in range(_count(masks)):
        mask = _seed(masks, i)
        at = locate_signature(mask, sig.code, cells=cells, prunable=config.prunable)
        embed = jax.jit(lambda m, s: embed_signature(m, s, sig.code, at=at, cells=cells, rebalance=config.rebalance,
                                                     prunable=config.prunable))
        new = embed(mask, _seed(scores, i))
        window = np.asarray(extract_signature(mask, at=at, shape=sig.code.shape))
        kept = lambda m: int(sum(np.sum(leaf) for path, leaf in zip(*leaves_with_paths(m)[:2])
                                 if config.prunable(path, leaf)))
        records.append({"path": at.path, "row": at.row, "col": at.col, "agreement": at.agreement,
                        "bit_error_before": float(bit_error(window, sig.code, sig.data)),
                        "cells_changed": int(np.sum(window != sig.code) if cells is None
                                             else np.sum((window != sig.code) & cells)),
                        "kept_before": kept(mask), "kept_after": kept(jax.tree.map(np.asarray, new))})
        signed.append(jax.tree.map(np.asarray, new))
        placements.append(at)
    return _stack(signed), placements, records


def _count(tree) -> int:
    return int(np.shape(jax.tree.leaves(tree)[0])[0])


def _read(sig: Signature, mask, at: Placement) -> tuple[dict, np.ndarray]:
    """What a verifier reads from one seed's mask at the placement ``at`` (bit errors and,
    for a QR code, whether it decodes), and the window itself."""
    window = np.asarray(extract_signature(mask, at=at, shape=sig.code.shape))
    out = {"bit_error": float(bit_error(window, sig.code, sig.data)),
           "bit_error_diluted": float(bit_error(window, sig.code, sig.data, diluted=True))}
    if sig.text is not None:
        out["decoded"] = decode_qr(window) == sig.text
        out["decoded_fixed"] = decode_qr(np.asarray(with_fixed_cells(window, sig))) == sig.text
    return out, window


def _pruner(config: VerificationConfig, pad, n: int, keys) -> Callable:
    """``prune(attack, params, mask)``: the masks of every seed after ``attack``'s pruning
    (one compiled program per score function, the fraction an argument; the mask itself
    when the attack prunes nothing)."""
    programs = {}

    def prune(attack: Attack, params, mask):
        if attack.scores is None:
            return mask
        if attack.scores not in programs:
            programs[attack.scores] = over_seeds(config, lambda p, m, k, f, scores=attack.scores: prune_global(
                scores(p, k), m, f, prunable=config.prunable), (0, 0, 0, None))
        pruned = programs[attack.scores](pad(params), pad(mask), keys, np.float32(attack.fraction))
        return jax.tree.map(lambda x: np.asarray(x)[:n], gather(pruned))

    return prune


@exclusive("verification")
def run_verification(config: VerificationConfig, root: str = "runs", *, progress: bool = True) -> tuple[dict, str]:
    """Runs (or resumes) the experiment; returns the summary (as in ``results.json``) and
    the run directory."""
    config.check()
    with open_run(root, "verification", config) as workdir:
        signature = make_signature(config)
        setup = build(config)
        start = time.perf_counter()
        imp = run_imp(setup.trainer, setup.data, seeds=config.seeds, rounds=config.rounds,
                      fraction=config.prune_rate, num_steps=config.num_steps, scope="global",
                      rewind_step=config.rewind_step, controls=(), prunable=config.prunable,
                      seed_strategy=config.seed_strategy, devices=config.devices,
                      checkpoint_dir=os.path.join(workdir, "imp"), progress=progress)
    imp_seconds = time.perf_counter() - start
    n = len(config.seeds)
    data = put_seeded(setup.data, config.devices, stacked=False)
    run = _Run(config, setup, signature, workdir, progress)
    pad = partial(put_seed_slots, config)
    mask = imp.masks[-1]
    rewind = imp.rewind_state
    data_keys, control_keys = stream_keys(config, "data", "control")
    shape, classes, scale = setup.data.input_shape, setup.data.num_classes, float(np.std(setup.data.x_train))
    triggers = jax.jit(jax.vmap(lambda k: trigger_set(jax.random.fold_in(k, TRIGGER_KEY), config.trigger_size, shape,
                                                      num_classes=classes, scale=scale)))(control_keys)
    plain, marked = _train_program(run, trigger=False, finetune=False), _train_program(run, trigger=True, finetune=False)
    args = lambda m: (pad(rewind), pad(m), triggers.x, triggers.y, data_keys, data)
    before = _trained(run, "before", plain, *args(mask))

    # The signature: scores are the trained magnitudes of kept weights, |θ_k| of pruned ones.
    scores = jax.tree.map(lambda m, w, w0: np.where(m, np.abs(w), np.abs(w0)), mask, before[0], rewind.params)
    signed_mask, placements, embed_records = _embed_all(run, mask, scores)
    signed = _trained(run, "signed", plain, *args(signed_mask))
    trigger = _trained(run, "trigger", marked, *args(mask))
    finetuned = {}  # only when an attack fine-tunes
    if any(ATTACKS[name].finetune for name in config.attacks):
        finetune = _train_program(run, trigger=False, finetune=True)
        for arm, model, arm_mask in (("signed", signed, signed_mask), ("trigger", trigger, mask)):
            start = pad(rewind._replace(params=model[0], model_state=model[1]))
            finetuned[arm] = _trained(run, f"{arm}-finetuned", finetune, start, pad(arm_mask), triggers.x, triggers.y,
                                      data_keys, data)

    def evaluate_one(params, state, mask, trigger_x, trigger_y, data):
        test = setup.trainer.evaluate(apply_mask(params, mask), state, data.x_test, data.y_test)
        trigger = setup.trainer.evaluate(apply_mask(params, mask), state, trigger_x, trigger_y)
        return test.accuracy, trigger.accuracy, ~jnp.isfinite(test.loss)

    evaluate = over_seeds(config, evaluate_one, (0, 0, 0, 0, 0, None))

    def accuracy(model, m):
        """Per seed: test accuracy and trigger accuracy of ``model`` under mask ``m``, NaN
        where the model diverged (its test loss is NaN or inf), and that flag."""
        test, trigger_accuracy, diverged = (np.asarray(a)[:n] for a in gather(
            evaluate(pad(model[0]), pad(model[1]), pad(m), triggers.x, triggers.y, data)))
        return np.where(diverged, np.nan, test), np.where(diverged, np.nan, trigger_accuracy), diverged

    prune = _pruner(config, pad, n, jax.vmap(jax.random.fold_in, (0, None))(control_keys, RANDOM_PRUNING))
    results, windows = {}, {}
    for name in config.attacks:
        attack = ATTACKS[name]
        models = {"signed": finetuned["signed"] if attack.finetune else signed,
                  "trigger": finetuned["trigger"] if attack.finetune else trigger}
        masks = {arm: prune(attack, models[arm][0], m) for arm, m in (("signed", signed_mask), ("trigger", mask))}
        test, _, signed_diverged = accuracy(models["signed"], masks["signed"])
        trigger_test, trigger_acc, _ = accuracy(models["trigger"], masks["trigger"])
        reads = [_read(signature, _seed(masks["signed"], i), placements[i]) for i in range(n)]
        windows.update({(name, i): window for i, (_, window) in enumerate(reads)})
        results[name] = {"test_accuracy": test, "trigger_accuracy": trigger_acc, "trigger_test_accuracy": trigger_test,
                         "reads": _flagged(reads, signed_diverged)}

    # The ambiguity control: the next seed's ticket and its unsigned model.
    before_test, unmarked_trigger, before_diverged = accuracy(before, mask)
    independent = {"placements": []}
    reads = []
    for i in range(n):
        at = locate_signature(_seed(mask, (i + 1) % n), signature.code, prunable=config.prunable)
        reads.append(_read(signature, _seed(mask, (i + 1) % n), at))
        windows[("independent", i)] = reads[-1][1]
        independent["placements"].append(at._asdict())
    next_seed = lambda tree: jax.tree.map(lambda x: np.roll(x, -1, axis=0), tree)
    _, independent["trigger_accuracy"], _ = accuracy(next_seed(before), next_seed(mask))
    independent["reads"] = _flagged(reads, next_seed(before_diverged))  # the next seed's ticket diverged

    summary = summarize(config, signature, imp, imp_seconds, before_test, unmarked_trigger, embed_records, results,
                        independent)
    if jax.process_index() == 0:
        arrays = {"code": signature.code, "data_cells": signature.data,
                  **{f"window/{name}/{i}": w for (name, i), w in windows.items()},
                  **{f"{name}/{k}": np.asarray(v) for name, r in results.items() for k, v in r.items() if k != "reads"}}
        write_results(workdir, summary, arrays)
        with open(os.path.join(workdir, "table.txt"), "w") as f:
            f.write(verification_table(summary) + "\n")
        maps = [np.asarray(connectivity(dict(zip(*leaves_with_paths(_seed(signed_mask, i))[:2]))[placements[i].path]))
                for i in range(n)]
        plot_verification(signature, maps, placements, windows, os.path.join(workdir, "verification.png"),
                          title=f"Signature in a {config.model} ticket on {config.dataset} "
                                f"({100 * summary['imp']['density']:.1f}% of the pruned kernels)")
    return summary, workdir


def _flagged(reads: list, diverged) -> list:
    """The reads (``(read, window)`` per seed) of :func:`_read`, those of the seeds whose
    model diverged replaced by NaN bit errors and ``None`` decodes: flagged, not counted."""
    return [{k: (float("nan") if k.startswith("bit_error") else None) for k in read} if flag else read
            for (read, _), flag in zip(reads, np.asarray(diverged, bool))]


def _reads_summary(reads: list) -> dict:
    """Bit errors as :func:`stats` (a diverged seed's NaN left out and counted); decodes as a
    count over the seeds that did not diverge (``per_seed`` ``None`` for those that did).

    Examples:
      >>> reads = [{'bit_error': 0.0, 'decoded': True}, {'bit_error': 0.5, 'decoded': False},
      ...          {'bit_error': float('nan'), 'decoded': None}]
      >>> out = _reads_summary([dict(r, bit_error_diluted=r['bit_error']) for r in reads])
      >>> out['bit_error']['n'], out['bit_error']['diverged'], out['decoded']
      (2, 1, {'count': 1, 'n': 2, 'per_seed': [True, False, None]})
    """
    out = {k: stats([r[k] for r in reads]) for k in ("bit_error", "bit_error_diluted")}
    for k in ("decoded", "decoded_fixed"):
        if reads and k in reads[0]:
            values = [r[k] for r in reads]
            out[k] = {"count": int(sum(v is True for v in values)), "n": sum(v is not None for v in values),
                      "per_seed": [None if v is None else bool(v) for v in values]}
    return out


def summarize(config, signature: Signature, imp, imp_seconds, before_test, unmarked_trigger, embed_records,
              results, independent) -> dict:
    """The JSON summary: IMP's ticket, the embedding, per attack the signed model's test
    accuracy and what a verifier reads, the trigger model's accuracies; the controls. A
    diverged seed (NaN already in ``results``, ``before_test`` ...; IMP's from its losses)
    is left out of every statistic and counted."""
    last = len(imp.density) - 1
    imp_diverged = diverged_runs(imp.history.train_loss, imp.history.val_loss)  # (levels, seeds, arms)
    return {
        "config": dataclasses.asdict(config),
        "signature": {"text": signature.text, "shape": list(signature.code.shape),
                      "data_cells": int(signature.data.sum()), "cells": int(signature.code.size)},
        "imp": {"density": float(imp.density[last].mean()), "level": last, "seconds": imp_seconds,
                "ticket_final_accuracy": stats(imp.final_accuracy[last, :, 0], diverged=imp_diverged[last, :, 0]),
                "dense_final_accuracy": stats(imp.final_accuracy[0, :, 0], diverged=imp_diverged[0, :, 0])},
        "before": {"test_accuracy": stats(before_test), "trigger_accuracy": stats(unmarked_trigger)},
        "embedding": embed_records,
        "attacks": {name: {"test_accuracy": stats(r["test_accuracy"]),
                           "trigger_accuracy": stats(r["trigger_accuracy"]),
                           "trigger_test_accuracy": stats(r["trigger_test_accuracy"]),
                           **_reads_summary(r["reads"])} for name, r in results.items()},
        "independent": {"trigger_accuracy": stats(independent["trigger_accuracy"]),
                        "placements": independent["placements"], **_reads_summary(independent["reads"])},
    }


def verification_table(summary: dict) -> str:
    """Per attack: the signed model's test accuracy, the bit error of its window (data cells;
    the reference's diluted figure), how many seeds' windows decode (raw; with the fixed
    patterns pasted), and the trigger model's trigger and test accuracy; then the
    independent ticket and model.

    Examples:
      >>> s = lambda m: {'mean': m, 'std': 0.0, 'n': 3}
      >>> d = lambda k: {'count': k, 'n': 3}
      >>> row = {'test_accuracy': s(.9), 'bit_error': s(0.), 'bit_error_diluted': s(0.), 'decoded': d(3),
      ...        'decoded_fixed': d(3), 'trigger_accuracy': s(1.), 'trigger_test_accuracy': s(.9)}
      >>> embedding = [{'path': 'conv1/kernel', 'agreement': .6, 'cells_changed': 336, 'kept_before': 9,
      ...               'kept_after': 9}]
      >>> summary = {'imp': {'density': .107, 'ticket_final_accuracy': s(.9)}, 'before': {'test_accuracy': s(.9),
      ...            'trigger_accuracy': s(.1)}, 'embedding': embedding, 'attacks': {'none': row},
      ...            'independent': dict(row, decoded=d(0))}
      >>> print(verification_table(summary))  # doctest: +NORMALIZE_WHITESPACE
      ticket: 10.70% of the pruned kernels; unsigned test accuracy 90.00 ± 0.00 (n=3), trigger accuracy 10.00 ± 0.00
      signature in conv1/kernel: agreement before embedding 60.0%; cells changed 336; kept weights changed by +0
      attack          signed test acc.  bit error (%)  diluted (%)  decoded  decoded+fixed | trigger acc.   test acc.
      none            90.00 ± 0.00      0.00 ± 0.00    0.00 ± 0.00  3/3      3/3           | 100.00 ± 0.00  90.00 ± 0.00
      independent     (best window)     0.00 ± 0.00    0.00 ± 0.00  0/3      3/3           | 100.00 ± 0.00
    """
    cell = lambda s: ("diverged" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
                      + (f" ({s['diverged']} diverged)" if s.get("diverged") else ""))
    count = lambda r, k: f"{r[k]['count']}/{r[k]['n']}" if k in r else "n/a"
    before = summary["before"]
    lines = [f"ticket: {100 * summary['imp']['density']:.2f}% of the pruned kernels; unsigned test accuracy "
             f"{cell(before['test_accuracy'])} (n={before['test_accuracy']['n']}), trigger accuracy "
             f"{cell(before['trigger_accuracy'])}"]
    embedded = summary["embedding"]
    if embedded:
        listed = lambda values: ", ".join(values)
        paths = listed(sorted({e["path"] for e in embedded}))
        agreement = listed(f"{100 * e['agreement']:.1f}%" for e in embedded)
        changed = listed(str(e["cells_changed"]) for e in embedded)
        kept = listed(f"{e['kept_after'] - e['kept_before']:+d}" for e in embedded)
        lines.append(f"signature in {paths}: agreement before embedding {agreement}; cells changed {changed}; "
                     f"kept weights changed by {kept}")
    lines += [f"{'attack':<15} {'signed test acc.':<17} {'bit error (%)':<14} {'diluted (%)':<12} {'decoded':<8} "
             f"{'decoded+fixed':<13} | {'trigger acc.':<14} test acc."]
    for name, r in summary["attacks"].items():
        lines.append(f"{name:<15} {cell(r['test_accuracy']):<17} {cell(r['bit_error']):<14} "
                     f"{cell(r['bit_error_diluted']):<12} {count(r, 'decoded'):<8} {count(r, 'decoded_fixed'):<13} | "
                     f"{cell(r['trigger_accuracy']):<14} {cell(r['trigger_test_accuracy'])}")
    r = summary["independent"]
    lines.append(f"{'independent':<15} {'(best window)':<17} {cell(r['bit_error']):<14} {cell(r['bit_error_diluted']):<12} "
                 f"{count(r, 'decoded'):<8} {count(r, 'decoded_fixed'):<13} | {cell(r['trigger_accuracy'])}")
    return "\n".join(lines)


def plot_verification(signature: Signature, maps, placements, windows: dict, path: str, *, title: str = "") -> None:
    """Per seed (rows): the signed layer's connectivity map with the window outlined, the
    code, the window after retraining, after 20% extra pruning (if run), and the
    independent ticket's best window; dark = a kept connection."""
    from matplotlib.patches import Rectangle

    columns = [("code", None), ("signed, retrained", "none"), ("+20% magnitude pruning", "prune20"),
               ("independent ticket, best window", "independent")]
    columns = [c for c in columns if c[1] is None or (c[1], 0) in windows]
    n = len(maps)
    fig, axes = figure(1 + len(columns), nrows=n, width=2.6, height=2.8)
    h, w = signature.code.shape
    for i in range(n):
        ax = axes[i * (1 + len(columns))]
        ax.imshow(maps[i], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.add_patch(Rectangle((placements[i].col - 0.5, placements[i].row - 0.5), w, h, fill=False, color="red"))
        ax.set_title(f"seed {i}: {placements[i].path} (out x in)", fontsize=8)
        for c, (label, key) in enumerate(columns, start=1):
            ax = axes[i * (1 + len(columns)) + c]
            image = signature.code if key is None else windows[(key, i)]
            ax.imshow(image, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            if key is not None:
                errors = np.argwhere((image != signature.code) & signature.data)
                ax.scatter(errors[:, 1], errors[:, 0], s=3, c="red", marker="s", linewidths=0)
            ax.set_title(label, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    save(fig, path, title=title)
