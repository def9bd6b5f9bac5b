"""One checkpointer for every resumable run, and run signatures that cannot go stale.

A run that takes minutes saves after every finished *unit* (an IMP level, a chunk of
epochs, one rewind step ``k``) and resumes from the last one. What it must never do is
resume a run made with other settings and hand back the old numbers. So the signature a
:class:`Checkpointer` checks covers everything that determines the result:

- :func:`program_fingerprint`: a hash of the *traced program* (the jaxpr of the training
  and initialisation functions): the model, the optimizer and every hyperparameter it was
  built with (a learning rate is a literal in the program), the batch size and the number
  of steps, whatever object the caller built them with;
- :func:`array_digest`: a hash of the data;
- :func:`describe`: the run's own settings (seeds, rates, score functions by name and the
  values they close over), as JSON.

A changed signature is an error that lists what changed; nothing is guessed.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from typing import Any, Callable, Optional

import jax
import numpy as np

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def program_fingerprint(fn: Callable, *args, **static) -> str:
    """A hash of the program ``fn(*args, **static)`` traces to: its jaxpr (printed, memory
    addresses removed) and the bytes of the constants it closes over. ``args`` may be
    arrays or ``jax.ShapeDtypeStruct``s; ``static`` are passed as Python values.

    Two functions built from the same model and optimizer with the same hyperparameters
    give the same fingerprint, in any process; change a learning rate and it differs.

    Examples:
      >>> import jax.numpy as jnp
      >>> step = lambda lr: (lambda w, g: w - lr * g)
      >>> w = jax.ShapeDtypeStruct((3,), jnp.float32)
      >>> program_fingerprint(step(0.1), w, w) == program_fingerprint(step(0.1), w, w)
      True
      >>> program_fingerprint(step(0.1), w, w) == program_fingerprint(step(0.5), w, w)
      False
    """
    closed = jax.make_jaxpr(lambda *a: fn(*a, **static))(*args)
    digest = hashlib.sha1(_ADDRESS.sub("", str(closed)).encode())
    for const in closed.consts:
        digest.update(np.ascontiguousarray(jax.device_get(const)).tobytes())
    return digest.hexdigest()[:16]


def array_digest(tree: Any) -> str:
    """A hash of every array leaf of ``tree`` (shapes, dtypes and bytes).

    Examples:
      >>> array_digest({'x': np.zeros(3)}) == array_digest({'x': np.zeros(3)})
      True
      >>> array_digest({'x': np.zeros(3)}) == array_digest({'x': np.ones(3)})
      False
    """
    digest = hashlib.sha1()
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(jax.device_get(leaf))
        digest.update(f"{leaf.shape}{leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def describe(value, depth: int = 0):
    """A JSON value that stays the same across processes: callables by module, name and
    the values they close over (no memory addresses), other objects by their repr.

    Examples:
      >>> from lottojax.prune import rates_by_layer
      >>> describe(rates_by_layer(conv=0.1, dense=0.2, output=0.1))['callable']
      'lottojax.prune.rates_by_layer.<locals>.rate'
    """
    import functools
    import json

    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        pass
    if isinstance(value, (tuple, list)) and depth < 3:
        return [describe(v, depth + 1) for v in value]
    if isinstance(value, functools.partial) and depth < 3:
        return {"partial": describe(value.func, depth + 1), "args": [describe(a, depth + 1) for a in value.args],
                "keywords": {k: describe(v, depth + 1) for k, v in sorted(value.keywords.items())}}
    if callable(value) and hasattr(value, "__qualname__"):
        name = f"{getattr(value, '__module__', '')}.{value.__qualname__}"
        cells = getattr(value, "__closure__", None) or ()
        if not cells or depth >= 3:
            return name
        return {"callable": name, "closure": [describe(c.cell_contents, depth + 1) for c in cells]}
    return _ADDRESS.sub("", repr(value))


def _changes(saved: dict, now: dict) -> dict:
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


class Checkpointer:
    """Saves a pytree after each finished unit of a run and restores the latest one.

    ``directory/run.json`` holds the run's signature; opening a directory whose signature
    differs raises a ``ValueError`` that lists the changed entries. Units are saved with
    orbax (sharded arrays of several processes included); the previous unit is kept
    until the next one is complete.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> ckpt = Checkpointer(d, {'lr': 0.1})
      >>> ckpt.latest() is None
      True
      >>> ckpt.save(1, {'w': jnp.ones(2)})
      >>> Checkpointer(d, {'lr': 0.1}).restore({'w': jnp.zeros(2)})
      (1, {'w': Array([1., 1.], dtype=float32)})
      >>> Checkpointer(d, {'lr': 0.5})
      Traceback (most recent call last):
      ...
      ValueError: ... holds a run with other settings ...: {'lr': (0.1, 0.5)}...
    """

    def __init__(self, directory: str, signature: dict, *, keep: int = 2):
        import json

        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        signature = json.loads(json.dumps(signature))
        path = os.path.join(self.directory, "run.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != signature:
                raise ValueError(
                    f"checkpoint directory {self.directory} holds a run with other settings (saved, now): "
                    f"{_changes(saved, signature)}. Use another directory, or delete this one to start over."
                )
        else:
            write_json(path, signature)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(os.path.join(self.directory, "units"), options=options)

    def latest(self) -> Optional[int]:
        """The latest saved unit, or ``None``."""
        return self._manager.latest_step()

    def save(self, unit: int, tree: Any) -> None:
        """Saves ``tree`` as unit ``unit`` and waits until it is on disk."""
        import orbax.checkpoint as ocp

        self._manager.save(unit, args=ocp.args.StandardSave(tree))
        self._manager.wait_until_finished()

    def restore(self, template: Any = None) -> tuple[Optional[int], Any]:
        """``(unit, tree)`` of the latest unit, shaped like ``template`` (without one: nested
        dicts of numpy arrays, as saved); ``(None, template)`` when nothing was saved."""
        import orbax.checkpoint as ocp

        unit = self.latest()
        if unit is None:
            return None, template
        abstract = None if template is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return unit, self._manager.restore(unit, args=ocp.args.StandardRestore(abstract))


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
    """Yields a temporary path beside ``path``; once the block has written it, it replaces
    ``path`` in one rename. If the block raises, the temporary file is removed and ``path``
    is left as it was: a reader never sees a half-written file.

    Examples:
      >>> import tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), 'note.txt')
      >>> with atomic_path(path) as tmp:
      ...     _ = open(tmp, 'w').write('done')
      >>> open(path).read(), os.listdir(os.path.dirname(path))
      ('done', ['note.txt'])
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (:func:`atomic_path`)."""
    import json

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def save_arrays(path: str, tree: Any) -> None:
    """Saves the leaves of ``tree`` to ``path`` (``.npz``) atomically; read back with
    :func:`load_arrays` and a template of the same structure.

    Examples:
      >>> import tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), 'level.npz')
      >>> save_arrays(path, {'a': np.arange(3), 'b': (np.ones(2, bool),)})
      >>> load_arrays(path, {'a': 0, 'b': (0,)})
      {'a': array([0, 1, 2]), 'b': (array([ True,  True]),)}
    """
    leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]
    with atomic_path(path, suffix=".tmp.npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, *leaves)


def load_arrays(path: str, template: Any) -> Any:
    """The arrays :func:`save_arrays` wrote, in the structure of ``template``."""
    treedef = jax.tree.structure(template)
    with np.load(path) as saved:
        leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"{path} holds {len(leaves)} arrays but {treedef.num_leaves} are expected: "
                         "it was written by another version or run; delete it to recompute")
    return jax.tree.unflatten(treedef, leaves)
