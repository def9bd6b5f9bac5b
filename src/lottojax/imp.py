"""Iterative magnitude pruning with rewinding and the LTH controls, many seeds at once.

Level 0 trains the dense network; each later level prunes the previous level's trained
ticket by magnitude, rewinds the survivors to ``θ_k`` (``k = rewind_step``; ``k = 0`` is
the original LTH), and trains again. Alongside the ticket, every level trains the two
controls of Frankle & Carbin on the *same* mask:

- ``reinit``: the ticket's mask on a fresh random initialisation (fresh model and
  optimizer state; trained for the same steps ``[k, T)``);
- ``shuffle``: the ticket's mask permuted within each layer (random pruning at the same
  per-layer density), rewound to ``θ_k``.

All arms of all seeds train in one jitted program per level (the next mask is computed
inside it), so the whole run compiles once, whatever the number of levels. The arms of a
seed are mapped like the seeds themselves (``seed_strategy``): batched on accelerators,
one after another on a CPU, where a batched Conv-2 step costs twice the single one.
With ``one_shot=True`` level ``L`` instead prunes the *dense* trained weights directly
to ``1 - (1 - p)^L`` (per layer), the one-shot baseline of the paper.
``retrain`` picks how the ticket retrains after each pruning (:data:`RETRAINING`): weight
rewinding to ``θ_k`` (the LTH), or the baselines of Renda et al. (2020), learning-rate
rewinding (trained weights, the schedule replayed from ``k``) and fine-tuning (trained
weights at the final rate).
A run given a ``checkpoint_dir`` saves after every level and resumes from the last
finished level when called again; the directory is tied to everything that determines
the result (see :mod:`lottojax.checkpoint`), so a changed model, optimizer, learning
rate or dataset is refused instead of resumed. Every level's ticket mask is kept
(``IMPResult.masks``, and ``levels/level-NNNN.npz`` in the checkpoint directory), with
``θ0`` and ``θ_k``.
"""
from __future__ import annotations

import os
from functools import partial
from types import MappingProxyType
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import (Checkpointer, array_digest, describe, load_arrays, load_npz, program_fingerprint,
                                 save_arrays)
from lottojax.masks import PyTree, Spec, apply_mask, density, leaves_with_paths, ones_like, prunable_flags, resolve_spec
from lottojax.optim import set_mask
from lottojax.methods import PruningMethod, ScoreContext, prune_with, resolve_method
from lottojax.prune import prune_layerwise
from lottojax.rewind import shuffle_mask
from lottojax.scores import magnitude
from lottojax.seeds import Devices, device_count, gather, map_seeds, pad_seeds, put_seeded, seed_keys
from lottojax.train import History, Trainer, TrainState, early_stop

class IMPResult(NamedTuple):
    """Per level, seed and arm (``arms[0]`` is always ``'ticket'``), as numpy arrays.

    Attributes:
      arms: arm names, e.g. ``('ticket', 'reinit', 'shuffle')``.
      seeds: the seeds, in the order of the seed axis.
      density: ``(levels, seeds)`` density of the prunable weights trained at each level.
      final_accuracy: ``(levels, seeds, arms)`` test accuracy after the last step.
      early_stop_step: ``(levels, seeds, arms)`` step of minimum validation loss.
      early_stop_accuracy: ``(levels, seeds, arms)`` test accuracy at that step.
      history: a :class:`lottojax.train.History` with leaves ``(levels, seeds, arms, evals)``.
      masks: one ticket mask per level (the mask trained there; level 0 is dense), leaves
        ``(seeds, *param shape)``. The ``shuffle`` control's mask is its per-layer permutation.
      init_params: ``θ0``, leaves ``(seeds, ...)``.
      rewind_state: the full training state at ``θ_k`` (params, model and optimizer state,
        step) every ticket is rewound to (``θ0``'s when ``k = 0``); ``rewind_params`` is its
        params.
    """

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    density: np.ndarray
    final_accuracy: np.ndarray
    early_stop_step: np.ndarray
    early_stop_accuracy: np.ndarray
    history: History
    masks: tuple = ()
    init_params: Optional[PyTree] = None
    rewind_state: Optional[TrainState] = None

    @property
    def rewind_params(self) -> PyTree:
        """``θ_k``: the weights every ticket is rewound to."""
        return None if self.rewind_state is None else self.rewind_state.params

    def ticket(self, level: int, seed_index: Optional[int] = None) -> tuple[PyTree, PyTree]:
        """``(mask, θ_k)`` of the ticket trained at ``level`` (all seeds, or one seed's)."""
        if not 0 <= level < len(self.masks):
            raise ValueError(f"level={level} is outside the {len(self.masks)} levels of this result")
        mask, params = self.masks[level], self.rewind_params
        if seed_index is not None:
            mask, params = _take((mask, params), seed_index)
        return mask, params

    def level_at_density(self, target: float) -> int:
        """The level whose mean density is closest to ``target`` (a fraction, e.g. ``0.113``)."""
        return int(np.argmin(np.abs(self.density.mean(axis=1) - target)))


def level_fraction(per_round: float, level: int, one_shot: bool) -> float:
    """The fraction pruned when moving to ``level``: ``p`` each round when iterative;
    ``1 - (1 - p)^level`` of the dense weights when one-shot.

    Examples:
      >>> level_fraction(0.2, 3, one_shot=False), round(level_fraction(0.2, 3, one_shot=True), 3)
      (0.2, 0.488)
    """
    return 1.0 - (1.0 - per_round) ** level if one_shot else per_round


def _fraction_tree(fraction: Spec, params: PyTree, prunable: Spec, level: int, one_shot: bool) -> PyTree:
    """Per-leaf float32 fractions for ``level`` (0 on leaves that are not pruned): passed to
    the compiled level as an argument, so changing it does not recompile."""
    paths, leaves, treedef = leaves_with_paths(params)
    flags = prunable_flags(params, prunable)
    values = resolve_spec(fraction, params, name="fraction", default=None)
    out = []
    for path, flag, value in zip(paths, flags, values):
        if flag and not 0.0 <= float(value) < 1.0:
            raise ValueError(f"fraction for {path}={value} is outside [0, 1): it is the per-round rate")
        out.append(np.float32(level_fraction(float(value), level, one_shot) if flag else 0.0))
    return jax.tree.unflatten(treedef, out)


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def _with_mask(state: TrainState, params: PyTree, mask: PyTree) -> TrainState:
    return state._replace(params=apply_mask(params, mask), opt_state=set_mask(state.opt_state, mask))


def rewind_weights(rewind_state: TrainState, mask: PyTree, *, trained: TrainState, trainer: Trainer, key,
                   prunable) -> TrainState:
    """Weight rewinding (the ticket of the LTH): the mask on ``θ_k`` with ``θ_k``'s optimizer state."""
    return _with_mask(rewind_state, rewind_state.params, mask)


def rewind_learning_rate(rewind_state: TrainState, mask: PyTree, *, trained: TrainState, trainer: Trainer, key,
                         prunable) -> TrainState:
    """Learning-rate rewinding (Renda et al. 2020): the mask on the *trained* weights, with the
    optimizer state of step ``k`` (its schedule count and moments), so the learning-rate
    schedule replays from ``k``."""
    return _with_mask(rewind_state, trained.params, mask)


def fine_tune(rewind_state: TrainState, mask: PyTree, *, trained: TrainState, trainer: Trainer, key,
              prunable) -> TrainState:
    """Fine-tuning (Renda et al. 2020): the mask on the trained weights, which keep training with
    their own optimizer state, so the schedule stays where training ended (its final rate)."""
    return _with_mask(trained, trained.params, mask)


def reinit_start(rewind_state: TrainState, mask: PyTree, *, trained: TrainState, trainer: Trainer, key,
                 prunable) -> TrainState:
    """Random reinitialisation: the mask on a fresh ``θ0'`` with a fresh optimizer, from step ``k``."""
    return trainer.init(jax.random.fold_in(key, 0), mask)._replace(step=rewind_state.step)


def shuffle_start(rewind_state: TrainState, mask: PyTree, *, trained: TrainState, trainer: Trainer, key,
                  prunable) -> TrainState:
    """Random pruning: the mask permuted within each layer, on ``θ_k``."""
    shuffled = shuffle_mask(mask, key=jax.random.fold_in(key, 1), prunable=prunable)
    return _with_mask(rewind_state, rewind_state.params, shuffled)


#: How the ticket retrains after each pruning, by name: ``(rewind_state, mask, *, trained,
#: trainer, key, prunable) -> the TrainState it trains from`` (``trained``: the state the
#: previous level ended in, the dense one for ``one_shot``). All train steps ``[k, T)``.
RETRAINING = MappingProxyType({"weights": rewind_weights, "lr": rewind_learning_rate, "finetune": fine_tune})

#: The arms of an IMP level, by name, with the signature of :data:`RETRAINING`. ``ticket``
#: always runs (retrained as ``run_imp``'s ``retrain`` says); the others are the
#: ``controls``. A new arm is one function and one entry here.
ARMS = MappingProxyType({"ticket": rewind_weights, "reinit": reinit_start, "shuffle": shuffle_start})
CONTROLS = ("reinit", "shuffle")


def _make_level(trainer: Trainer, arms, *, retrain, scope, prunable, rewind_step, num_steps, one_shot, method,
                statics, arm_strategy, on_evaluation=None):
    """The compiled program of one level for one seed (mapped over seeds by the caller); its
    arms are mapped by ``arm_strategy`` (see :func:`lottojax.seeds.map_seeds`)."""
    starts = dict(ARMS, ticket=RETRAINING[retrain])

    def level_one_seed(rewind_state, mask, trained, fractions, level, data, data_key, control_key):
        control_key = jax.random.fold_in(control_key, level)
        starting = _stack([starts[a](rewind_state, mask, trained=trained, trainer=trainer, key=control_key,
                                     prunable=prunable) for a in arms])
        train = partial(trainer.train, data=data, key=data_key, start=rewind_step, num_steps=num_steps - rewind_step,
                        **({} if on_evaluation is None else dict(on_evaluation=on_evaluation)))
        final, history = map_seeds(train, in_axes=(0,), strategy=arm_strategy)(starting)
        ticket = _take(final, 0)
        if one_shot:  # every level prunes (and fine-tunes) the dense network trained at level 0
            trained = jax.tree.map(lambda old, new: jnp.where(level == 0, new, old), trained, ticket)
        else:
            trained = ticket
        context = ScoreContext(
            apply_fn=lambda p, x: trainer.apply(p, ticket.model_state, x, True)[0],
            eval_apply_fn=lambda p, x: trainer.apply(p, ticket.model_state, x, False)[0],
            x=data.x_train, y=data.y_train, **statics)
        prune = partial(prune_with, method, key=jax.random.fold_in(control_key, 2), context=context,
                        fraction=fractions, scope=scope, prunable=prunable)
        next_mask = prune(trained.params, ones_like(mask) if one_shot else mask)
        es_step, es_accuracy = early_stop(history)
        record = dict(
            density=density(mask, prunable),
            final_accuracy=history.test_accuracy[:, -1],
            early_stop_step=es_step,
            early_stop_accuracy=es_accuracy,
            history=history,
        )
        return record, next_mask, trained

    return level_one_seed


def run_imp(
    trainer: Trainer,
    data,
    *,
    seeds: Sequence[int],
    rounds: int,
    fraction: Spec,
    num_steps: int,
    scope: str = "layerwise",
    rewind_step: int = 0,
    one_shot: bool = False,
    controls: Sequence[str] = CONTROLS,
    retrain: str = "weights",
    prunable: Spec = None,
    method: Union[str, PruningMethod, Callable[[PyTree], PyTree]] = "magnitude",
    init_params: Optional[PyTree] = None,
    seed_strategy: str = "auto",
    devices: Devices = None,
    checkpoint_dir: Optional[str] = None,
    progress: bool = True,
    on_level: Optional[Callable[[int, IMPResult], None]] = None,
) -> IMPResult:
    """Runs IMP for all ``seeds`` at once (see the module docstring).

    Args:
      trainer: from :func:`lottojax.train.make_trainer`; its optimizer must end with
        :func:`lottojax.masked_updates`.
      data: a :class:`lottojax.data.Dataset` (with a validation split: early stopping).
      seeds: integer seeds; seed ``s`` derives every key of its run from ``jax.random.key(s)``
        (the streams of :data:`lottojax.seeds.KEY_STREAMS`).
      rounds: pruning rounds after the dense level (levels ``0..rounds``).
      fraction: per-round rate: a float, a prefix pytree, or ``(path, leaf) -> float``
        (e.g. :func:`lottojax.rates_by_layer`); with ``scope='global'`` a float.
      num_steps: training steps ``T`` per level.
      scope: ``'layerwise'`` (per-layer rates, the LTH setting) or ``'global'``.
      rewind_step: ``k``; survivors are reset to their values after ``k`` dense steps.
      one_shot: prune the dense weights straight to each level's density.
      controls: any of ``('reinit', 'shuffle')`` (the keys of :data:`ARMS` but ``ticket``).
      retrain: how the ticket retrains after each pruning (a key of :data:`RETRAINING`):
        ``'weights'`` rewinds the survivors to ``θ_k`` (the LTH); ``'lr'`` keeps the trained
        weights and replays the learning-rate schedule from step ``k`` (learning-rate
        rewinding); ``'finetune'`` keeps the trained weights and their optimizer state (the
        final learning rate). Each trains ``T - k`` steps; the controls are unchanged.
      prunable: which leaves may be pruned (default ``ndim >= 2``).
      method: how the trained weights are scored at every level (higher = keep): a
        registered name of :data:`lottojax.methods.METHODS` (default ``'magnitude'``: IMP
        proper; ``'snip'`` rescores the trained ticket on a batch of ``data``), a
        :class:`lottojax.methods.PruningMethod`, or a plain ``params -> scores`` function.
        Data-driven methods see the training split and the ticket's model state. It is
        traced inside the compiled level, so it must be jittable.
      init_params: start from these weights instead of ``trainer.init``'s (e.g. a
        pre-trained network): one params tree for every seed, or leaves stacked
        ``(seeds, ...)``. Model and optimizer state still come from ``trainer.init``
        (optax's optimizers initialise from shapes only, so this is a fresh optimizer).
      seed_strategy: ``'auto'`` (``'map'`` on CPU, ``'vmap'`` on accelerators), ``'vmap'``
        (one batched program) or ``'map'`` (seeds one after another in one program, each
        computed as it would be alone); see :mod:`lottojax.seeds`. The arms of each seed
        are mapped the same way.
      devices: split the seeds across devices: ``'all'`` (every device of every process,
        after ``jax.distributed.initialize()`` on multi-host), a list of devices or a
        :class:`jax.sharding.Mesh`. Seeds are padded to a multiple of the device count
        (extra runs are dropped). ``None``: the default device.
      checkpoint_dir: save after each level; resume from there. The directory is tied to
        everything that determines the result: these arguments, the traced training
        program (model, optimizer and its hyperparameters, batch size, evaluation
        interval) and the data; a call that differs in any of them is refused. ``rounds``
        is not part of it: call again with more rounds to extend a finished run.
      progress: show a progress bar over levels (``tqdm.auto``: a widget in notebooks) that
        also moves at every evaluation inside a level; only then does the compiled level
        call the host (``on_evaluation`` of the trainer's ``train``).
      on_level: called with ``(level, result_so_far)`` after each level is saved.

    Returns:
      An :class:`IMPResult`.
    """
    unknown = set(controls) - set(ARMS) | ({"ticket"} & set(controls))
    if unknown:
        raise ValueError(f"controls {sorted(unknown)} unknown; choose from {tuple(a for a in ARMS if a != 'ticket')}")
    if retrain not in RETRAINING:
        raise ValueError(f"retrain={retrain!r} unknown; choose from {tuple(RETRAINING)}")
    if scope not in ("layerwise", "global"):
        raise ValueError(f"scope={scope!r}: use 'layerwise' or 'global'")
    if not 0 <= rewind_step < num_steps:
        raise ValueError(f"rewind_step={rewind_step} must be in [0, num_steps={num_steps})")
    if len(data.x_val) == 0:
        raise ValueError("data has no validation split: IMP records the early-stop step from validation loss")
    if rounds < 0 or not seeds:
        raise ValueError(f"rounds={rounds} must be >= 0 and seeds={seeds} non-empty")
    arms = ("ticket", *controls)
    seeds = tuple(int(s) for s in seeds)
    slots = pad_seeds(seeds, device_count(devices))
    data = put_seeded(data, devices, stacked=False)
    over_seeds = lambda fn, in_axes: jax.jit(map_seeds(fn, in_axes=in_axes, strategy=seed_strategy, devices=devices))

    init_keys, data_keys, control_keys = (put_seeded(seed_keys(slots, s), devices, stacked=True)
                                          for s in ("init", "data", "control"))
    init_state = over_seeds(lambda k: trainer.init(k), (0,))(init_keys)
    shapes = jax.eval_shape(trainer.init, jax.random.key(0)).params
    if init_params is not None:
        init_state = init_state._replace(params=_seeded_params(init_params, shapes, slots, devices))
    one_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # for paths and shapes
    fractions_at = lambda level: _fraction_tree(fraction, one_params, prunable, level, one_shot)
    if scope == "global":
        if callable(fraction) or jax.tree.structure(fraction).num_leaves != 1:
            raise ValueError("scope='global' takes one float fraction")
        fractions_at = lambda level: np.float32(level_fraction(float(fraction), level, one_shot))
    prune_layerwise(magnitude(one_params), ones_like(one_params), fractions_at(1), prunable=prunable)  # validates

    method = as_method(method)
    bar = _LevelProgress(levels=rounds + 1) if progress else None
    level_one_seed = _make_level(
        trainer, arms, retrain=retrain, scope=scope, prunable=prunable, rewind_step=rewind_step, num_steps=num_steps,
        one_shot=one_shot, method=method, statics=dict(input_shape=data.input_shape, num_classes=data.num_classes),
        arm_strategy=seed_strategy, on_evaluation=None if bar is None else bar.evaluation,
    )
    level_fn = over_seeds(level_one_seed, (0, 0, 0, None, None, None, 0, 0))
    levels = rounds + 1
    masks = over_seeds(ones_like, (0,))(init_state.params)
    carry = dict(level=np.array(0, np.int32), mask=masks, trained=init_state, rewind_state=init_state)
    level_args = lambda carry, level: (
        carry["rewind_state"], carry["mask"], carry["trained"], fractions_at(level + 1),
        np.int32(level), data, data_keys, control_keys,
    )
    record_shape = jax.eval_shape(level_fn, *level_args(carry, 0))[0]
    if bar is not None:  # one call per evaluation of every (seed slot, arm) run
        bar.evaluations_per_level = record_shape["history"].step.size
    record_template = (masks, record_shape)

    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = Checkpointer(checkpoint_dir, _signature(
            trainer, data, init_state, num_steps=num_steps, seeds=list(seeds), fraction=fraction, scope=scope,
            rewind_step=rewind_step, one_shot=one_shot, controls=list(controls), retrain=retrain, prunable=prunable,
            method=method, init_params=init_params, seed_slots=len(slots)))
    done = []  # per finished level: host copies of its record and the mask it trained
    unit, carry = (None, carry) if checkpoint is None else checkpoint.restore(carry)
    if unit is not None:
        done = [load_arrays(_level_file(checkpoint_dir, level), record_template) for level in range(min(unit, levels))]
        done = [dict(mask=mask, record=record) for mask, record in done]
        if progress:
            print(f"resuming {checkpoint.directory} at level {unit}", flush=True)
    elif rewind_step > 0:
        to_k = over_seeds(partial(trainer.run_steps, start=0, num_steps=rewind_step), (0, None, 0))
        carry["rewind_state"], _ = to_k(init_state, data, data_keys)
        carry["trained"] = carry["rewind_state"]  # level 0 trains the dense net from θ_k in every mode

    rewind_state = gather(carry["rewind_state"])
    init_host = gather(init_state.params)
    if bar is not None:
        bar.start(len(done))
    for level in range(len(done), levels):
        record, next_mask, trained = level_fn(*level_args(carry, level))
        done.append(dict(record=gather(record), mask=gather(carry["mask"])))
        carry.update(level=np.array(level + 1, np.int32), mask=next_mask, trained=trained)
        if checkpoint is not None:
            if jax.process_index() == 0:
                save_arrays(_level_file(checkpoint_dir, level), (done[-1]["mask"], done[-1]["record"]))
            checkpoint.save(level + 1, carry)
        result = _as_result(done, arms, seeds, init_host, rewind_state)
        if bar is not None:
            bar.level_done(level, density=result.density[-1].mean(), ticket=result.early_stop_accuracy[-1, :, 0].mean())
        if on_level is not None:
            on_level(level, result)
    if bar is not None:
        bar.close()
    return _as_result(done[:levels], arms, seeds, init_host, rewind_state)


def _seeded_params(init_params: PyTree, shapes: PyTree, slots, devices) -> PyTree:
    """``init_params`` as leaves ``(len(slots), ...)``: broadcast when given for one seed."""
    n = len(slots)
    given = jax.tree.leaves(init_params)
    expected = jax.tree.leaves(shapes)
    if jax.tree.structure(init_params) != jax.tree.structure(shapes):
        raise ValueError("init_params must have the structure of trainer.init's params "
                         f"({jax.tree.structure(shapes).num_leaves} leaves)")
    paths = leaves_with_paths(shapes)[0]
    stacked = []
    for path, x, s in zip(paths, given, expected):
        x = jnp.asarray(x, s.dtype)
        if x.shape == s.shape:
            x = jnp.broadcast_to(x, (n, *s.shape))
        elif x.shape[1:] == s.shape and x.shape[0] <= n:
            x = jnp.concatenate([x, jnp.broadcast_to(x[-1], (n - x.shape[0], *s.shape))])
        else:
            raise ValueError(f"init_params leaf {path} has shape {x.shape}; expected {s.shape} "
                             f"or {(n, *s.shape)} for the seeds")
        stacked.append(x)
    return put_seeded(jax.tree.unflatten(jax.tree.structure(shapes), stacked), devices, stacked=True)


def _signature(trainer: Trainer, data, init_state: TrainState, *, num_steps: int, **settings) -> dict:
    """What determines an IMP run's result, as JSON (see ``checkpoint_dir`` of :func:`run_imp`)."""
    one_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), init_state)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    data_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)
    program = program_fingerprint(trainer.train, one_state, data_shapes, key, 0, num_steps=num_steps)
    init = program_fingerprint(trainer.init, key)
    return dict(program=program, init=init, data=array_digest(data), num_steps=num_steps,
                **{k: describe(v) for k, v in settings.items() if v is not None})


def as_method(method) -> PruningMethod:
    """A :class:`lottojax.methods.PruningMethod` from a registered name, a method, or a
    ``params -> scores`` function (named by its qualified name).

    Examples:
      >>> as_method('snip').name, as_method(lambda p: p).name
      ('snip', '<lambda>')
    """
    if callable(method) and not isinstance(method, PruningMethod):
        function = method
        return PruningMethod(getattr(function, "__qualname__", "scores"), lambda params, **unused: function(params))
    return resolve_method(method)


def _level_file(directory: str, level: int) -> str:
    os.makedirs(os.path.join(directory, "levels"), exist_ok=True)
    return os.path.join(directory, "levels", f"level-{level:04d}.npz")


def saved_masks(checkpoint_dir: str, mask_template: PyTree, levels: int) -> tuple:
    """The ticket masks of levels ``0..levels-1`` that :func:`run_imp` saved in
    ``checkpoint_dir`` (leaves ``(seed slots, ...)``, shaped like ``mask_template``)."""
    treedef = jax.tree.structure(mask_template)
    masks = []
    for level in range(levels):
        path = os.path.join(checkpoint_dir, "levels", f"level-{level:04d}.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: level {level} of this run was not saved")
        saved = load_npz(path)  # a (mask, record) tuple: the mask's leaves come first
        masks.append(jax.tree.unflatten(treedef, [saved[f"arr_{i}"] for i in range(treedef.num_leaves)]))
    return tuple(masks)


def _as_result(done: list, arms, seeds, init_params, rewind_state) -> IMPResult:
    n = len(seeds)
    records = jax.tree.map(lambda *xs: np.stack(xs)[:, :n], *[d["record"] for d in done])
    masks = tuple(jax.tree.map(lambda m: np.asarray(m)[:n], d["mask"]) for d in done)
    cut = lambda tree: jax.tree.map(lambda x: np.asarray(x)[:n], tree)
    return IMPResult(arms=arms, seeds=seeds, history=records.pop("history"), masks=masks,
                     init_params=cut(init_params), rewind_state=cut(rewind_state), **records)


class _LevelProgress:
    """A bar over IMP levels that moves by a fraction of a level at every evaluation inside
    the compiled level (``evaluation`` runs on the host through ``jax.debug.callback``)."""

    def __init__(self, levels: int):
        self.levels, self.evaluations_per_level, self.bar = levels, 1, None

    def start(self, done: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.levels, initial=done, desc="IMP levels", unit="level",
                        bar_format="{l_bar}{bar}| {n:.2f}/{total} levels [{elapsed}<{remaining}{postfix}]")

    def evaluation(self, step) -> None:
        del step
        if self.bar is not None and self.bar.n < int(self.bar.n) + 1 - 0.5 / self.evaluations_per_level:
            self.bar.update(1 / self.evaluations_per_level)  # never past the level (callbacks are unordered)

    def level_done(self, level: int, *, density: float, ticket: float) -> None:
        self.bar.n = level + 1
        self.bar.set_postfix(density=f"{density:.3f}", ticket=f"{ticket:.3f}")  # refreshes

    def close(self) -> None:
        self.bar.close()
