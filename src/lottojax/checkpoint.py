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

Nothing a killed, crashed or damaged run wrote is trusted blindly (``docs/reliability.md``):

- every file is written atomically (:func:`atomic_path`), and a unit counts as saved only
  once all its files are on disk and their SHA-256 digests are recorded in the directory's
  ``CHECKSUMS.json``: a unit cut short by a kill is dropped and the previous one, kept until
  then, is restored;
- :func:`write_json`, :func:`save_arrays` and :func:`save_npz` record digests the same way
  inside a run directory (:func:`recording`), and :func:`read_json`, :func:`load_arrays`
  and :func:`load_npz` check them: an edited, truncated or damaged file is a
  :class:`CorruptFileError` that names it and says how to roll back;
- :func:`fault_point` marks the write windows where the fault-injection tests kill a run.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import zipfile
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


#: Environment variable that arms :func:`fault_point` (tests only).
FAULT_ENV = "LOTTOJAX_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str, detail: str = "") -> None:
    """A named point inside a write where the fault-injection tests strike. With
    ``LOTTOJAX_FAULT=name@N`` the ``N``-th pass of this process through ``name`` kills it
    (``SIGKILL``, as the OOM killer or a pre-empted machine would); ``name/text@N`` counts
    only passes whose ``detail`` (e.g. the file written) contains ``text``; ``...@N:enospc``
    raises the "no space left on device" ``OSError`` there instead. Unset, it does nothing.

    Examples:
      >>> fault_point("atomic_write", "results.json")  # unarmed: a no-op
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, rest = spec.partition("@")
    target_name, _, text = target.partition("/")
    if target_name != name or text not in detail:
        return
    count, _, action = rest.partition(":")
    _fault_hits[target] = _fault_hits.get(target, 0) + 1
    if _fault_hits[target] != int(count or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (fault injected at {name})")
    os.kill(os.getpid(), signal.SIGKILL)


class CorruptFileError(ValueError):
    """A file of a run is damaged, edited or truncated; ``path`` names it."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


#: The digest file of a directory: ``{file name: [sha256, ...]}`` for the files written there.
MANIFEST = "CHECKSUMS.json"
_recorded: list[str] = []  # directories whose writes are recorded (see recording())


@contextlib.contextmanager
def recording(directory: str):
    """Within the block, files written by :func:`write_json`, :func:`save_arrays` and
    :func:`save_npz` anywhere under ``directory`` get their digests recorded (in the
    ``CHECKSUMS.json`` beside them), so later reads detect edits and damage.
    :func:`lottojax.experiments.store.open_run` records its run directory."""
    directory = os.path.abspath(directory)
    _recorded.append(directory)
    try:
        yield
    finally:
        _recorded.remove(directory)


def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(directory: str) -> Optional[dict]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(path, f"cannot be read ({error}); delete it to stop checking the files "
                                     f"of {directory} (they are then trusted as they are)") from None
    if not isinstance(manifest, dict):
        raise CorruptFileError(path, "is not a JSON object of file digests; delete it to stop checking")
    return manifest


def _write_manifest(directory: str, manifest: dict) -> None:
    path = os.path.join(directory, MANIFEST)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _records(path: str) -> bool:
    directory = os.path.dirname(os.path.abspath(path))
    return (any(directory == d or directory.startswith(d + os.sep) for d in _recorded)
            or os.path.exists(os.path.join(directory, MANIFEST)))


def _record(path: str, digest: Optional[str], *, also: Optional[str] = None) -> None:
    """Sets the accepted digests of ``path`` (``None``: forget it); ``also`` keeps one more
    accepted while a rename is pending, so a kill between the two writes is no false alarm."""
    directory, name = os.path.split(os.path.abspath(path))
    manifest = _read_manifest(directory) or {}
    if digest is None:
        manifest.pop(name, None)
    else:
        manifest[name] = sorted({digest, *([also] if also else [])})
    _write_manifest(directory, manifest)


def verify_file(path: str) -> None:
    """Raises :class:`CorruptFileError` if ``path`` differs from every digest recorded for it
    (files without a record are not checked).

    Examples:
      >>> d = tempfile.mkdtemp()
      >>> with recording(d):
      ...     write_json(os.path.join(d, 'a.json'), [1, 2])
      >>> verify_file(os.path.join(d, 'a.json'))
      >>> _ = open(os.path.join(d, 'a.json'), 'w').write('[1, 3]')
      >>> verify_file(os.path.join(d, 'a.json'))
      Traceback (most recent call last):
      ...
      lottojax.checkpoint.CorruptFileError: .../a.json: differs from the file that was written ...
    """
    directory, name = os.path.split(os.path.abspath(path))
    manifest = _read_manifest(directory)
    if manifest is None or name not in manifest:
        return
    if file_digest(path) not in manifest[name]:
        raise CorruptFileError(path, "differs from the file that was written (its SHA-256 is not the one recorded "
                                     f"in {os.path.join(directory, MANIFEST)}): it was edited, truncated or damaged. "
                                     + ROLL_BACK_HINT.format(path=path))


#: What a :class:`CorruptFileError` of a run's file suggests.
ROLL_BACK_HINT = ("Delete {path} and run the same command again: what it held is recomputed from the last "
                  "good checkpoint (see docs/reliability.md, 'Rolling back').")


def _changes(saved: dict, now: dict) -> dict:
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


class Checkpointer:
    """Saves a pytree after each finished unit of a run and restores the latest one.

    ``directory/run.json`` holds the run's signature; opening a directory whose signature
    differs raises a ``ValueError`` that lists the changed entries. Units are saved with
    orbax (sharded arrays of several processes included) under ``units/<unit>``; a unit is
    complete once the digests of all its files are in ``CHECKSUMS.json``. The previous
    complete unit is kept until the next one is complete: a unit cut short by a kill is
    dropped when the directory is opened again, and :meth:`restore` checks every file of
    the unit it reads (a :class:`CorruptFileError` naming the file otherwise; delete
    ``units/<unit>`` to roll back to the one before).

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
        import orbax.checkpoint as ocp

        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        self.keep = keep
        os.makedirs(self.directory, exist_ok=True)
        signature = json.loads(json.dumps(signature))
        path = os.path.join(self.directory, "run.json")
        with recording(self.directory):
            if os.path.exists(path):
                saved = read_json(path)
                if saved != signature:
                    raise ValueError(
                        f"checkpoint directory {self.directory} holds a run with other settings (saved in run.json, "
                        f"now): {_changes(saved, signature)}. Use another directory, or delete this one to start over."
                    )
            else:
                write_json(path, signature)
        self._drop_incomplete()
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(os.path.join(self.directory, "units"), options=options)

    def _units_on_disk(self) -> list[int]:
        units = os.path.join(self.directory, "units")
        names = os.listdir(units) if os.path.isdir(units) else []
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(units, n)))

    def _listed(self) -> dict[int, dict[str, list]]:
        """Per unit recorded in the manifest, its files' digests."""
        listed: dict[int, dict[str, list]] = {}
        for name, digests in (_read_manifest(self.directory) or {}).items():
            parts = name.split("/", 2)
            if len(parts) == 3 and parts[0] == "units" and parts[1].isdigit():
                listed.setdefault(int(parts[1]), {})[name] = digests
        return listed

    def _drop_incomplete(self) -> None:
        """Removes units newer than the newest recorded one (a save cut short before its
        digests were recorded) and forgets records of units deleted by hand (a roll back)."""
        listed = self._listed()
        on_disk = self._units_on_disk()
        newest = max(listed) if listed else None
        for unit in on_disk:
            if newest is not None and unit > newest and unit not in listed:
                shutil.rmtree(os.path.join(self.directory, "units", str(unit)), ignore_errors=True)
        gone = [u for u in listed if u not in on_disk]
        if gone and jax.process_index() == 0:
            manifest = _read_manifest(self.directory) or {}
            for unit in gone:
                for name in listed[unit]:
                    manifest.pop(name, None)
            _write_manifest(self.directory, manifest)

    def latest(self) -> Optional[int]:
        """The latest complete unit, or ``None``."""
        return self._manager.latest_step()

    def save(self, unit: int, tree: Any) -> None:
        """Saves ``tree`` as unit ``unit`` and waits until it is on disk and recorded; then
        deletes the units older than the ``keep`` latest."""
        import orbax.checkpoint as ocp

        if unit in self._manager.all_steps():
            self._manager.delete(unit)
        self._manager.save(unit, args=ocp.args.StandardSave(tree), force=True)
        fault_point("checkpoint_write")
        self._manager.wait_until_finished()
        fault_point("checkpoint_commit")
        writer = jax.process_index() == 0  # one writer of the digests; every process deletes (orbax syncs them)
        manifest = _read_manifest(self.directory) or {}
        root = os.path.join(self.directory, "units", str(unit))
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                manifest[os.path.relpath(path, self.directory).replace(os.sep, "/")] = [file_digest(path)]
        if writer:
            _write_manifest(self.directory, manifest)
        for old in sorted(self._manager.all_steps())[:-self.keep]:
            for name in [n for n in manifest if n.startswith(f"units/{old}/")]:
                manifest.pop(name)
            if writer:
                _write_manifest(self.directory, manifest)
            self._manager.delete(old)

    def verify(self, unit: int) -> None:
        """Raises :class:`CorruptFileError` naming the first file of ``unit`` that is missing
        or differs from what was saved."""
        root = os.path.join(self.directory, "units", str(unit))
        listed = self._listed().get(unit, {})
        on_disk = {os.path.relpath(os.path.join(folder, name), self.directory).replace(os.sep, "/")
                   for folder, _, files in os.walk(root) for name in files}
        for name in sorted(set(listed) | (on_disk if listed else set())):
            path = os.path.join(self.directory, name)
            if name not in listed or not os.path.exists(path) or file_digest(path) not in listed[name]:
                what = "was added" if name not in listed else "is missing" if not os.path.exists(path) else "differs"
                raise CorruptFileError(path, f"{what} since unit {unit} was saved. {self._roll_back_hint(unit)}")

    def _roll_back_hint(self, unit: int) -> str:
        earlier = [u for u in self._manager.all_steps() if u < unit]
        to = f"unit {max(earlier)}, the last good one" if earlier else "the start"
        return (f"To roll back to {to}, delete {os.path.join(self.directory, 'units', str(unit))} and run again "
                "(docs/reliability.md, 'Rolling back').")

    def restore(self, template: Any = None) -> tuple[Optional[int], Any]:
        """``(unit, tree)`` of the latest unit, shaped like ``template`` (without one: nested
        dicts of numpy arrays, as saved); ``(None, template)`` when nothing was saved."""
        import orbax.checkpoint as ocp

        unit = self.latest()
        if unit is None:
            return None, template
        self.verify(unit)
        abstract = None if template is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            return unit, self._manager.restore(unit, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # orbax's and tensorstore's errors do not say what to do
            raise CorruptFileError(os.path.join(self.directory, "units", str(unit)),
                                   f"cannot be restored ({type(error).__name__}: {error}). "
                                   f"{self._roll_back_hint(unit)}") from error


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
    """Yields a temporary path beside ``path``; once the block has written it, it replaces
    ``path`` in one rename. If the block raises, the temporary file is removed and ``path``
    is left as it was: a reader never sees a half-written file. Inside a recorded run
    directory (:func:`recording`) the new file's digest is recorded too.

    Examples:
      >>> import tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), 'note.txt')
      >>> with atomic_path(path) as tmp:
      ...     _ = open(tmp, 'w').write('done')
      >>> open(path).read(), os.listdir(os.path.dirname(path))
      ('done', ['note.txt'])
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    except OSError as error:
        raise _clear_os_error(error, path) from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files: give the new file the usual mode
        fault_point("atomic_write", os.path.basename(path))
        if _records(path):
            digest = file_digest(tmp)
            old = file_digest(path) if os.path.exists(path) else None
            _record(path, digest, also=old)  # either file is accepted until the rename is done
            os.replace(tmp, path)
            _record(path, digest)
        else:
            os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise _clear_os_error(error, path) from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_UMASK = os.umask(0)
os.umask(_UMASK)


def _clear_os_error(error: OSError, path: str) -> OSError:
    """``error`` with a message that names ``path`` and says what to do."""
    if error.errno == errno.ENOSPC:
        how = "the disk is full: free space or choose another output directory; finished units are kept"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        how = "the directory is not writable: fix its permissions or choose another output directory"
    else:
        return error
    return type(error)(error.errno, f"cannot write {path}: {how} ({os.strerror(error.errno)})")


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def read_json(path: str):
    """The JSON that :func:`write_json` wrote, checked against its recorded digest
    (:func:`verify_file`); a damaged file is a :class:`CorruptFileError` naming it.

    Examples:
      >>> path = os.path.join(tempfile.mkdtemp(), 'a.json')
      >>> write_json(path, {'x': 1}); read_json(path)
      {'x': 1}
    """
    verify_file(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(path, f"is not valid JSON ({error}). {ROLL_BACK_HINT.format(path=path)}") from None


def save_npz(path: str, arrays: dict) -> None:
    """``np.savez(path, **arrays)`` written atomically, with its digest recorded in a run
    directory; read back with :func:`load_npz`.

    Examples:
      >>> path = os.path.join(tempfile.mkdtemp(), 'arm.npz')
      >>> save_npz(path, {'acc': np.array([0.5, 0.25])}); load_npz(path)
      {'acc': array([0.5 , 0.25])}
    """
    with atomic_path(path, suffix=".tmp.npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, **{k: np.asarray(jax.device_get(v)) for k, v in arrays.items()})


def load_npz(path: str) -> dict:
    """Every array of an ``.npz`` file as a dict, checked against its recorded digest; a
    damaged or truncated file is a :class:`CorruptFileError` naming it."""
    verify_file(path)
    try:
        with np.load(path) as saved:
            return dict(saved)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as error:
        raise CorruptFileError(path, f"cannot be read ({type(error).__name__}: {error}). "
                                     f"{ROLL_BACK_HINT.format(path=path)}") from None


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
    save_npz(path, {f"arr_{i}": x for i, x in enumerate(jax.tree.leaves(tree))})


def load_arrays(path: str, template: Any) -> Any:
    """The arrays :func:`save_arrays` wrote, in the structure of ``template``."""
    treedef = jax.tree.structure(template)
    saved = load_npz(path)
    leaves = [saved[f"arr_{i}"] for i in range(len(saved))]
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"{path} holds {len(leaves)} arrays but {treedef.num_leaves} are expected: "
                         "it was written by another version or run; delete it to recompute")
    return jax.tree.unflatten(treedef, leaves)
