"""Iterative magnitude pruning with rewinding and the LTH controls, many seeds at once.

Level 0 trains the dense network; each later level prunes the previous level's trained
ticket by magnitude, rewinds the survivors to ``θ_k`` (``k = rewind_step``; ``k = 0`` is
the original LTH), and trains again. Alongside the ticket, every level trains the two
controls of Frankle & Carbin on the *same* mask:

- ``reinit``: the ticket's mask on a fresh random initialisation (fresh model and
  optimizer state; trained for the same steps ``[k, T)``);
- ``shuffle``: the ticket's mask permuted within each layer (random pruning at the same
  per-layer density), rewound to ``θ_k``.

All arms of all seeds train in one ``jax.vmap``-ed, jitted program per level (the next
mask is computed inside it), so the whole run compiles once, whatever the number of
levels. With ``one_shot=True`` level ``L`` instead prunes the *dense* trained weights
directly to ``1 - (1 - p)^L`` (per layer), the one-shot baseline of the paper.
A run given a ``checkpoint_dir`` saves after every level (orbax) and resumes from the
last finished level when called again with the same arguments.
"""
from __future__ import annotations

import json
import os
import re
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.masks import PyTree, Spec, apply_mask, density, leaves_with_paths, ones_like, prunable_flags, resolve_spec
from lottojax.optim import set_mask
from lottojax.prune import prune_global, prune_layerwise
from lottojax.rewind import shuffle_mask
from lottojax.scores import magnitude
from lottojax.seeds import Devices, device_count, gather, map_seeds, pad_seeds, put_seeded
from lottojax.train import History, Trainer, TrainState, early_stop

CONTROLS = ("reinit", "shuffle")


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
      mask: the ticket mask trained at the last level, leaves ``(seeds, *param shape)``
        (the ``shuffle`` control's mask is its per-layer permutation).
    """

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    density: np.ndarray
    final_accuracy: np.ndarray
    early_stop_step: np.ndarray
    early_stop_accuracy: np.ndarray
    history: History
    mask: Optional[PyTree] = None


def level_fraction(per_round: float, level: int, one_shot: bool) -> float:
    """The fraction pruned when moving to ``level``: ``p`` each round when iterative;
    ``1 - (1 - p)^level`` of the dense weights when one-shot.

    Examples:
      >>> level_fraction(0.2, 3, one_shot=False), round(level_fraction(0.2, 3, one_shot=True), 3)
      (0.2, 0.488)
    """
    return 1.0 - (1.0 - per_round) ** level if one_shot else per_round


def run_keys(seeds: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys :func:`run_imp` derives from each seed: ``(init, data order, controls)``,
    each of shape ``(len(seeds),)``; ``θ_k`` of seed ``s`` is ``trainer.init(init[s])``
    trained ``k`` steps with key ``data[s]``.

    Examples:
      >>> init, data, control = run_keys([0, 1, 2])
      >>> init.shape, bool((jax.random.key_data(init) != jax.random.key_data(data)).any())
      ((3,), True)
    """
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return tuple(jax.vmap(jax.random.fold_in, (0, None))(keys, i) for i in range(3))


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


def _arm_start(arm: str, rewind_state: TrainState, mask: PyTree, trainer: Trainer, key, prunable) -> TrainState:
    if arm == "ticket":
        return _with_mask(rewind_state, rewind_state.params, mask)
    if arm == "reinit":
        return trainer.init(jax.random.fold_in(key, 0), mask)._replace(step=rewind_state.step)
    shuffled = shuffle_mask(mask, key=jax.random.fold_in(key, 1), prunable=prunable)
    return _with_mask(rewind_state, rewind_state.params, shuffled)


def _make_level(trainer: Trainer, arms, *, scope, prunable, rewind_step, num_steps, one_shot, score_fn):
    """The compiled program of one level for one seed (vmapped over seeds by the caller)."""
    prune = prune_global if scope == "global" else prune_layerwise

    def level_one_seed(rewind_state, mask, dense_params, fractions, level, data, data_key, control_key):
        control_key = jax.random.fold_in(control_key, level)
        starts = _stack([_arm_start(a, rewind_state, mask, trainer, control_key, prunable) for a in arms])
        train = partial(trainer.train, data=data, key=data_key, start=rewind_step, num_steps=num_steps - rewind_step)
        final, history = jax.vmap(lambda s: train(s))(starts)
        ticket_params = _take(final.params, 0)
        dense_params = jax.tree.map(lambda d, t: jnp.where(level == 0, t, d), dense_params, ticket_params)
        if one_shot:
            next_mask = prune(score_fn(dense_params), ones_like(mask), fractions, prunable=prunable)
        else:
            next_mask = prune(score_fn(ticket_params), mask, fractions, prunable=prunable)
        es_step, es_accuracy = early_stop(history)
        record = dict(
            density=density(mask, prunable),
            final_accuracy=history.test_accuracy[:, -1],
            early_stop_step=es_step,
            early_stop_accuracy=es_accuracy,
            history=history,
        )
        return record, next_mask, dense_params

    return level_one_seed


def _describe(value, depth: int = 0):
    """A JSON value that stays the same across processes: callables by module, name and
    the values they close over (no memory addresses), other objects by their repr.

    Examples:
      >>> from lottojax.prune import rates_by_layer
      >>> _describe(rates_by_layer(conv=0.1, dense=0.2, output=0.1))
      {'callable': 'lottojax.prune.rates_by_layer.<locals>.rate', 'closure': [0.1, 0.2, 0.1, 'output']}
    """
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        pass
    if isinstance(value, partial) and depth < 3:
        return {"partial": _describe(value.func, depth + 1), "args": [_describe(a, depth + 1) for a in value.args],
                "keywords": {k: _describe(v, depth + 1) for k, v in sorted(value.keywords.items())}}
    if callable(value) and hasattr(value, "__qualname__"):
        name = f"{getattr(value, '__module__', '')}.{value.__qualname__}"
        cells = getattr(value, "__closure__", None) or ()
        if not cells or depth >= 3:
            return name
        return {"callable": name, "closure": [_describe(c.cell_contents, depth + 1) for c in cells]}
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _run_signature(**settings) -> dict:
    return {k: _describe(v) for k, v in settings.items()}


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
    prunable: Spec = None,
    score_fn: Callable[[PyTree], PyTree] = magnitude,
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
      seeds: integer seeds; seed ``s`` derives every key of its run from ``jax.random.key(s)``.
      rounds: pruning rounds after the dense level (levels ``0..rounds``).
      fraction: per-round rate: a float, a prefix pytree, or ``(path, leaf) -> float``
        (e.g. :func:`lottojax.rates_by_layer`); with ``scope='global'`` a float.
      num_steps: training steps ``T`` per level.
      scope: ``'layerwise'`` (per-layer rates, the LTH setting) or ``'global'``.
      rewind_step: ``k``; survivors are reset to their values after ``k`` dense steps.
      one_shot: prune the dense weights straight to each level's density.
      controls: any of ``('reinit', 'shuffle')``.
      prunable: which leaves may be pruned (default ``ndim >= 2``).
      score_fn: ``params -> scores`` used to prune the trained weights at every level
        (higher = keep); default :func:`lottojax.magnitude` (IMP proper). Close over
        anything else it needs, e.g. ``lambda p: lj.snip(p, apply_fn=..., batch=...)``.
        It is traced inside the compiled level, so it must be jittable.
      seed_strategy: ``'auto'`` (``'map'`` on CPU, ``'vmap'`` on accelerators), ``'vmap'``
        (one batched program) or ``'map'`` (seeds one after another in one program, each
        computed as it would be alone); see :mod:`lottojax.seeds`.
      devices: split the seeds across devices: ``'all'`` (every device of every process,
        after ``jax.distributed.initialize()`` on multi-host), a list of devices or a
        :class:`jax.sharding.Mesh`. Seeds are padded to a multiple of the device count
        (extra runs are dropped). ``None``: the default device.
      checkpoint_dir: save after each level; resume from there.
      progress: show a progress bar over levels.
      on_level: called with ``(level, result_so_far)`` after each level is saved.

    Returns:
      An :class:`IMPResult`.
    """
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise ValueError(f"controls {sorted(unknown)} unknown; choose from {CONTROLS}")
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

    init_keys, data_keys, control_keys = put_seeded(run_keys(slots), devices, stacked=True)
    init_state = over_seeds(lambda k: trainer.init(k), (0,))(init_keys)
    shapes = jax.eval_shape(trainer.init, jax.random.key(0)).params
    one_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # for paths and shapes
    fractions_at = lambda level: _fraction_tree(fraction, one_params, prunable, level, one_shot)
    if scope == "global":
        if callable(fraction) or jax.tree.structure(fraction).num_leaves != 1:
            raise ValueError("scope='global' takes one float fraction")
        fractions_at = lambda level: np.float32(level_fraction(float(fraction), level, one_shot))
    prune_layerwise(magnitude(one_params), ones_like(one_params), fractions_at(1), prunable=prunable)  # validates

    level_one_seed = _make_level(
        trainer, arms, scope=scope, prunable=prunable, rewind_step=rewind_step, num_steps=num_steps,
        one_shot=one_shot, score_fn=score_fn,
    )
    level_fn = over_seeds(level_one_seed, (0, 0, 0, None, None, None, 0, 0))

    levels = rounds + 1
    masks = over_seeds(ones_like, (0,))(init_state.params)
    level_args = lambda carry, level: (
        carry["rewind_state"], carry["mask"], carry["dense_params"], fractions_at(level + 1),
        np.int32(level), data, data_keys, control_keys,
    )
    carry = dict(level=np.array(0, np.int32), mask=masks, trained_mask=masks, dense_params=init_state.params,
                 rewind_state=init_state)
    record_shape = jax.eval_shape(level_fn, *level_args(carry, 0))[0]
    carry["results"] = jax.tree.map(lambda s: np.full((levels, *s.shape), -1 if s.dtype == jnp.int32 else np.nan, s.dtype), record_shape)
    signature = _run_signature(seeds=list(seeds), rounds=rounds, fraction=fraction, num_steps=num_steps, scope=scope,
                               rewind_step=rewind_step, one_shot=one_shot, controls=list(controls),
                               **({} if score_fn is magnitude else {"score_fn": score_fn}),
                               **({} if slots == seeds else {"seed_slots": len(slots)}))
    manager = _checkpoints(checkpoint_dir, signature)
    if manager is not None and manager.latest_step() is not None:
        carry = _restore(manager, carry)
    elif rewind_step > 0:
        to_k = over_seeds(partial(trainer.run_steps, start=0, num_steps=rewind_step), (0, None, 0))
        carry["rewind_state"], _ = to_k(init_state, data, data_keys)

    bar = _progress(levels, int(carry["level"]), progress)
    for level in range(int(carry["level"]), levels):
        record, next_mask, dense_params = level_fn(*level_args(carry, level))
        for store, value in zip(jax.tree.leaves(carry["results"]), jax.tree.leaves(gather(record))):
            store[level] = value
        carry.update(level=np.array(level + 1, np.int32), mask=next_mask, trained_mask=carry["mask"],
                     dense_params=dense_params)
        if manager is not None:
            _save(manager, level + 1, carry)
        result = _as_result(carry, arms, seeds, level + 1, with_mask=False)
        if bar is not None:
            bar.set_postfix(density=f"{result.density[-1].mean():.3f}", ticket=f"{result.early_stop_accuracy[-1, :, 0].mean():.3f}")
            bar.update()
        if on_level is not None:
            on_level(level, result)
    if bar is not None:
        bar.close()
    return _as_result(carry, arms, seeds, levels, with_mask=True)


def _checkpoints(directory: Optional[str], signature: dict):
    if directory is None:
        return None
    import orbax.checkpoint as ocp

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != signature:
            changed = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
            raise ValueError(
                f"checkpoint_dir {directory} holds a run with other settings (saved, now): {changed}. "
                "Use a new directory, or delete this one to start over."
            )
    else:
        with open(path, "w") as f:
            json.dump(signature, f, indent=1)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(directory, "levels")), options=options)


def _save(manager, level: int, carry: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(level, args=ocp.args.StandardSave(carry))
    manager.wait_until_finished()


def _restore(manager, carry: dict) -> dict:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, carry)
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    restored["results"] = jax.tree.map(np.array, restored["results"])
    return restored


def _as_result(carry: dict, arms, seeds, levels: int, *, with_mask: bool) -> IMPResult:
    n = len(seeds)
    done = jax.tree.map(lambda x: x[:levels, :n], carry["results"])
    mask = jax.tree.map(lambda m: np.asarray(m)[:n], gather(carry["trained_mask"])) if with_mask else None
    return IMPResult(arms=arms, seeds=seeds, history=done.pop("history"), mask=mask, **done)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="IMP levels", unit="level")
