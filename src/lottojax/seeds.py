"""The seed axis: one function run for many seeds, batched, sequential, or across devices.

:func:`map_seeds` turns ``fn`` (written for one seed) into a function of seed-stacked
arguments, by one of two strategies:

- ``'vmap'``: one batched program (``jax.vmap``). Best on accelerators, where the seeds
  fill the device; on a CPU, batched matrix products can be slower per seed than the
  plain ones (see ``experiments/benchmarks/seeds.py``).
- ``'map'``: the seeds one after another inside one compiled program (``lax.map``):
  the same computation as running each seed alone, in one call.
- ``'auto'`` (the default of the drivers): ``'map'`` on CPU, ``'vmap'`` elsewhere. On 2
  CPU cores ``'map'`` was never slower per seed than a Python loop of single-seed calls,
  while ``'vmap'`` ranged from 0.8x to 1.15x of it (``experiments/benchmarks/seeds.py``).

With ``devices``, the seed axis is split across them with ``jax.shard_map`` over a
one-axis :class:`jax.sharding.Mesh`: each device runs the strategy over its own seeds,
and nothing else changes. This covers several local devices and, after
``jax.distributed.initialize()`` on every process, the devices of all hosts.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

STRATEGIES = ("auto", "vmap", "map")
AXIS = "seeds"
Devices = Union[None, str, Sequence[Any], Mesh]

#: The named key streams of a seed, defined once for every experiment: stream ``name``
#: of seed ``s`` is ``jax.random.key(s)`` folded in with each index of ``KEY_STREAMS[name]``
#: in turn. ``init``: θ0; ``data``: the data order; ``control``: the IMP controls (reinit,
#: shuffle); ``copies``: the data orders of the stability copies; ``mask``: the random
#: draws of pruning at initialisation (derived from ``init``, as it always was); ``corrupt``:
#: the random corruptions of the robustness experiment's test inputs.
KEY_STREAMS = {"init": (0,), "data": (1,), "control": (2,), "copies": (3,), "mask": (0, 2), "corrupt": (4,)}


def seed_keys(seeds: Sequence[int], stream: str) -> jax.Array:
    """The keys of one named stream (:data:`KEY_STREAMS`) for each seed, shape ``(len(seeds),)``.

    Examples:
      >>> keys = seed_keys([0, 1, 2], 'init')
      >>> keys.shape, bool((jax.random.key_data(keys) != jax.random.key_data(seed_keys([0, 1, 2], 'data'))).any())
      ((3,), True)
      >>> seed_keys([0], 'weights')
      Traceback (most recent call last):
      ...
      ValueError: stream='weights' unknown; the key streams are ['init', 'data', 'control', 'copies', 'mask', 'corrupt']
    """
    if stream not in KEY_STREAMS:
        raise ValueError(f"stream={stream!r} unknown; the key streams are {list(KEY_STREAMS)}")
    keys = jax.vmap(jax.random.key)(np.asarray([int(s) for s in seeds], np.uint32))
    for index in KEY_STREAMS[stream]:
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys, index)
    return keys


def resolve_strategy(strategy: str) -> str:
    """``'auto'`` → ``'map'`` on CPU, ``'vmap'`` on accelerators; others unchanged.

    Examples:
      >>> resolve_strategy('vmap'), resolve_strategy('auto') in ('map', 'vmap')
      ('vmap', True)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose from {STRATEGIES}")
    if strategy == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def _map_over_leading_axis(fn: Callable, in_axes: Sequence[Optional[int]]) -> Callable:
    def mapped(*args):
        seeded = [i for i, axis in enumerate(in_axes) if axis == 0]

        def one_seed(slices):
            full = list(args)
            for i, value in zip(seeded, slices):
                full[i] = value
            return fn(*full)

        return jax.lax.map(one_seed, tuple(args[i] for i in seeded))

    return mapped


def seed_mesh(devices: Devices = "all") -> Optional[Mesh]:
    """A one-axis mesh named ``'seeds'`` over ``devices``: ``'all'`` (every device of every
    process), a sequence of devices, or a ready :class:`Mesh`; ``None`` gives ``None``.

    Examples:
      >>> seed_mesh('all').axis_names
      ('seeds',)
    """
    if devices is None or isinstance(devices, Mesh):
        return devices
    chosen = jax.devices() if isinstance(devices, str) and devices == "all" else list(devices)
    if isinstance(devices, str) and devices != "all":
        raise ValueError(f"devices={devices!r}: use 'all', a list of devices, a Mesh, or None")
    return Mesh(np.array(chosen), (AXIS,))


def map_seeds(
    fn: Callable,
    *,
    in_axes: Sequence[Optional[int]],
    strategy: str = "vmap",
    devices: Devices = None,
) -> Callable:
    """Maps ``fn`` over the leading (seed) axis of the arguments whose ``in_axes`` is 0.

    Args:
      fn: a function of one seed's arguments.
      in_axes: per positional argument, ``0`` (stacked over seeds) or ``None`` (shared).
      strategy: ``'auto'``, ``'vmap'`` or ``'map'`` (module docstring).
      devices: ``None`` (the default device), ``'all'``, a list of devices or a
        :class:`Mesh` with one axis: the seeds are split across them (their number must be
        a multiple of the number of devices: see :func:`pad_seeds`). Shared arguments are
        replicated; outputs are sharded along the seed axis.

    Returns:
      A function of the same arguments with every output stacked over seeds. Jit it.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = map_seeds(lambda w, x: w * x, in_axes=(0, None), strategy='map')
      >>> f(jnp.array([1., 2., 3.]), 10.)
      Array([10., 20., 30.], dtype=float32)
    """
    strategy = resolve_strategy(strategy)
    if any(axis not in (0, None) for axis in in_axes):
        raise ValueError(f"in_axes={tuple(in_axes)}: each entry is 0 (per seed) or None (shared)")
    local = jax.vmap(fn, in_axes=tuple(in_axes)) if strategy == "vmap" else _map_over_leading_axis(fn, in_axes)
    mesh = seed_mesh(devices)
    if mesh is None:
        return local
    specs = tuple(PartitionSpec(AXIS) if axis == 0 else PartitionSpec() for axis in in_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(AXIS), check_vma=False)


def device_count(devices: Devices) -> int:
    """How many devices the seed axis is split across (1 without devices)."""
    mesh = seed_mesh(devices)
    return 1 if mesh is None else mesh.size


def pad_seeds(seeds: Sequence[int], multiple: int) -> tuple[int, ...]:
    """``seeds`` extended by repeats of the last one to a multiple of ``multiple`` (the
    device count); the extra runs are computed and dropped.

    Examples:
      >>> pad_seeds([0, 1, 2, 3, 4], 1), pad_seeds([0, 1, 2], 2)
      ((0, 1, 2, 3, 4), (0, 1, 2, 2))
    """
    seeds = tuple(int(s) for s in seeds)
    return seeds + (seeds[-1],) * (-len(seeds) % multiple)


def put_seeded(tree: Any, devices: Devices, *, stacked: bool) -> Any:
    """Places a pytree on ``devices``: leaves sharded along their leading (seed) axis when
    ``stacked``, replicated otherwise. Every process must pass the same values (they are
    computed deterministically from the seeds); without devices, the default device.

    Examples:
      >>> import jax.numpy as jnp
      >>> put_seeded({'w': jnp.ones((4, 2))}, 'all', stacked=True)['w'].sharding.spec
      P('seeds',)
    """
    mesh = seed_mesh(devices)
    if mesh is None:
        return jax.device_put(tree)
    sharding = NamedSharding(mesh, PartitionSpec(AXIS) if stacked else PartitionSpec())

    def place(x):
        if jax.dtypes.issubdtype(jax.numpy.result_type(x), jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(place, tree)


def gather(tree: Any) -> Any:
    """Host numpy copies of a pytree of arrays, also when they span several processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
