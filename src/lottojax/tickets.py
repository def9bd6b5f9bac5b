"""Tickets you keep: a mask, the weights to rewind to, and what made them, in one file.

On-disk format (version 1): **one ``.npz`` file** (a zip archive that ``numpy.load``
opens), holding

- ``mask/<path>.npy``: every mask leaf (bool), keyed by its tree path
  (``lottojax.masks.path_str``, e.g. ``mask/fc0/kernel.npy``);
- ``params/<path>.npy``: every parameter leaf (the weights to rewind to: θ0 or θ_k), same
  paths; dtypes numpy cannot name (``bfloat16``) are stored as unsigned integers of the
  same width and restored from the recorded dtype;
- ``ticket.json``: the metadata, UTF-8 JSON (read it with ``unzip -p ticket.npz
  ticket.json``)::

      {"format": "lottojax.ticket", "version": 1,
       "seeds": null,                      # or n: every leaf has a leading seed axis of n
       "nested_dict": true,                # rebuildable from the paths without like=
       "leaves": [{"path": "fc0/kernel", "shape": [40, 300], "dtype": "float32",
                   "prunable": true}, ...],       # in tree-flatten order
       "density": 0.21,                    # kept / total over the prunable leaves (per seed
       "layers": {"fc0/kernel": {"kept": 2520, "total": 12000, "density": 0.21}, ...},
                                           #  a list when seeds is set)
       "metadata": {...}}                  # the caller's (config, level, seed, ...)

One file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a save that is killed leaves either the old ticket or the new one,
never half of one. A batch of tickets (one per seed) is one file: ``save_ticket(...,
seeds=True)`` takes trees whose leaves have a leading seed axis, as ``jax.vmap`` returns
them; ``load_ticket`` returns them stacked the same way.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lottojax.checkpoint import atomic_path
from lottojax.masks import PyTree, Spec, check_mask, leaves_with_paths, prunable_flags

FORMAT = "lottojax.ticket"
VERSION = 1
_META = "ticket.json"


class Ticket(NamedTuple):
    """A loaded ticket.

    Attributes:
      mask: the bool mask (jax arrays), same structure as ``params``.
      params: the weights to rewind to (jax arrays, dtypes as saved).
      metadata: the caller's metadata, as saved (JSON types).
      info: the file's own record: ``format``, ``version``, ``seeds``, ``leaves``
        (path, shape, dtype, prunable), ``density`` and ``layers`` (see the module doc).
    """

    mask: PyTree
    params: PyTree
    metadata: dict
    info: dict


def _json_default(value):
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _storable(array: np.ndarray) -> np.ndarray:
    """``array`` as numpy can write it: dtypes numpy cannot describe become uints."""
    descr = np.lib.format.dtype_to_descr(array.dtype)
    if np.lib.format.descr_to_dtype(descr) == array.dtype:
        return array
    return array.view(f"u{array.dtype.itemsize}")


def _rebuild_nested(paths: list[str], leaves: list) -> dict:
    tree: dict = {}
    for path, leaf in zip(paths, leaves):
        node = tree
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path} goes through a leaf")
        node[parts[-1]] = leaf
    return tree


def _layer_record(mask_leaves, paths, flags, seeds: Optional[int]) -> tuple[Any, dict]:
    kept_all, total_all, layers = 0, 0, {}
    for path, m, flag in zip(paths, mask_leaves, flags):
        if not flag:
            continue
        axes = tuple(range(1 if seeds else 0, m.ndim))
        kept = np.sum(m, axis=axes, dtype=np.int64)
        total = int(np.prod(m.shape[1:] if seeds else m.shape))
        kept_all, total_all = kept_all + kept, total_all + total
        layers[path] = {"kept": kept.tolist(), "total": total, "density": (kept / total).tolist()}
    if total_all == 0:
        return None, layers
    return (kept_all / total_all).tolist(), layers


def save_ticket(path, *, mask: PyTree, params: PyTree, metadata: Optional[dict] = None,
                seeds: bool = False, prunable: Spec = None) -> str:
    """Writes a ticket (mask, weights to rewind to, metadata) to one ``.npz`` file, atomically.

    Args:
      path: the file to write (``.npz`` is the usual suffix; none is added); its directory
        must exist. An existing ticket there is replaced.
      mask: the bool mask, structure and shapes of ``params``.
      params: the weights to rewind to (θ0, or θ_k for late rewinding).
      metadata: JSON-serializable caller metadata (numpy scalars and arrays are converted),
        e.g. ``{'config': dataclasses.asdict(config), 'level': 7, 'seed': 0}``.
      seeds: ``True`` if every leaf has a leading seed axis (a batch of tickets); the
        densities are then recorded per seed.
      prunable: which leaves count in the recorded densities (default: kernels, decided on
        one seed's shapes).

    Returns:
      ``path``, as a string.

    Raises:
      ValueError: naming the tree path if the mask does not describe ``params`` or is not
        bool, if two leaves share a path, or if ``metadata`` is not JSON-serializable.

    Examples:
      >>> import tempfile, os
      >>> params = {'fc0': {'kernel': jnp.arange(6.).reshape(2, 3), 'bias': jnp.zeros(3)}}
      >>> mask = {'fc0': {'kernel': params['fc0']['kernel'] > 2, 'bias': jnp.ones(3, bool)}}
      >>> path = os.path.join(tempfile.mkdtemp(), 'ticket.npz')
      >>> _ = save_ticket(path, mask=mask, params=params, metadata={'level': 3})
      >>> ticket = load_ticket(path)
      >>> ticket.metadata, ticket.info['density'], ticket.mask['fc0']['kernel'].tolist()
      ({'level': 3}, 0.5, [[False, False, False], [True, True, True]])
    """
    path = os.fspath(path)
    check_mask(params, mask)
    paths, mask_leaves, _ = leaves_with_paths(mask)
    param_leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    mask_leaves = [np.asarray(m) for m in mask_leaves]
    seen = set()
    for p in paths:
        if p in seen:
            raise ValueError(f"two leaves share the path {p!r}; the ticket format keys leaves by path "
                             "(a dict key containing '/' can collide with a nested path)")
        seen.add(p)
    n_seeds = None
    if seeds:
        sizes = {x.shape[0] if x.ndim else None for x in param_leaves}
        if len(sizes) != 1 or None in sizes:
            bad = next(p for p, x in zip(paths, param_leaves) if not x.ndim or x.shape[0] != param_leaves[0].shape[0])
            raise ValueError(f"seeds=True: every leaf needs the same leading seed axis; params leaf {bad} has shape "
                             f"{param_leaves[paths.index(bad)].shape}, leaf {paths[0]} {param_leaves[0].shape}")
        n_seeds = int(sizes.pop())
    one = jax.tree.map(lambda x: x[0], mask) if seeds else mask
    flags = prunable_flags(one, prunable)
    density, layers = _layer_record(mask_leaves, paths, flags, n_seeds)
    try:
        rebuilt = _rebuild_nested(paths, param_leaves)
        nested = jax.tree.structure(rebuilt) == jax.tree.structure(params) and all(paths)
    except ValueError:
        nested = False
    info = {
        "format": FORMAT,
        "version": VERSION,
        "seeds": n_seeds,
        "nested_dict": bool(nested),
        "leaves": [{"path": p, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name, "prunable": f}
                   for p, x, f in zip(paths, param_leaves, flags)],
        "density": density,
        "layers": layers,
    }
    try:
        text = json.dumps({**info, "metadata": metadata if metadata is not None else {}},
                          default=_json_default, indent=1, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata for {path} is not JSON-serializable: {e}") from None

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.writestr(_META, text)
            for kind, leaves in (("mask", mask_leaves), ("params", param_leaves)):
                for p, x in zip(paths, leaves):
                    with archive.open(f"{kind}/{p}.npy", "w", force_zip64=True) as entry:
                        np.lib.format.write_array(entry, _storable(np.ascontiguousarray(x)), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return path


def _read_info(archive: zipfile.ZipFile, path: str) -> dict:
    try:
        info = json.loads(archive.read(_META).decode("utf-8"))
    except KeyError:
        raise ValueError(f"{path} is not a lottojax ticket: it has no {_META}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {_META} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lottojax ticket ({_META} has no format={FORMAT!r})")
    if info.get("version") != VERSION:
        raise ValueError(f"{path} is ticket format version {info.get('version')}; this lottojax reads version {VERSION}")
    return info


def _read_leaf(archive: zipfile.ZipFile, path: str, name: str, shape, dtype) -> np.ndarray:
    try:
        with archive.open(name) as entry:
            raw = np.lib.format.read_array(io.BytesIO(entry.read()), allow_pickle=False)
    except KeyError:
        raise ValueError(f"{path}: the leaf {name} listed in {_META} is missing; the file is corrupt") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: cannot read {name} ({e}); the file is corrupt") from None
    if raw.dtype != dtype and raw.dtype.kind == "u" and raw.dtype.itemsize == dtype.itemsize:
        raw = raw.view(dtype)
    if raw.dtype != dtype or raw.shape != shape:
        raise ValueError(f"{path}: {name} has shape {raw.shape} and dtype {raw.dtype}, but {_META} records "
                         f"{shape} and {dtype}; the file is corrupt")
    return raw


def load_ticket(path, *, like: Optional[PyTree] = None) -> Ticket:
    """Reads a ticket written by :func:`save_ticket`.

    Args:
      path: the ticket file.
      like: a pytree with the structure of the saved params (e.g. an ``nnx.State``, a list,
        or ``jax.eval_shape`` of the init), whose leaves are arrays or
        ``jax.ShapeDtypeStruct``: the leaves are restored into its structure, matched by
        path. Its leaf shapes must be the saved ones (for a ticket saved with
        ``seeds=True``, with or without the seed axis) and its dtypes the saved ones.
        Without ``like``, the trees are rebuilt as nested dicts from the paths (Flax linen
        params), which needs a ticket whose params were nested dicts.

    Returns:
      A :class:`Ticket` of jax arrays (stacked when saved with ``seeds=True``).

    Raises:
      ValueError: naming the file and the tree path for a file that is not a ticket or is
        corrupt, or a ``like`` whose paths, shapes or dtypes differ from the ticket's.

    Examples:
      >>> import tempfile, os
      >>> params = [jnp.ones((2, 2)), jnp.zeros(2)]  # not a dict: load with like=
      >>> path = save_ticket(os.path.join(tempfile.mkdtemp(), 't.npz'),
      ...                    mask=[jnp.eye(2, dtype=bool), jnp.ones(2, bool)], params=params)
      >>> load_ticket(path, like=params).mask[0].tolist()
      [[True, False], [False, True]]
    """
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no ticket at {path}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a lottojax ticket (not a readable .npz archive: {e})") from None
    with archive:
        info = _read_info(archive, path)
        try:
            leaves_info = [(d["path"], tuple(d["shape"]), jnp.dtype(d["dtype"])) for d in info["leaves"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: {_META} has a malformed 'leaves' list ({e!r}); the file is corrupt") from None
        params_leaves, mask_leaves = [], []
        for p, shape, dtype in leaves_info:
            params_leaves.append(_read_leaf(archive, path, f"params/{p}.npy", shape, dtype))
            mask_leaves.append(_read_leaf(archive, path, f"mask/{p}.npy", shape, np.dtype(bool)))
    paths = [p for p, _, _ in leaves_info]
    if like is None:
        if not info.get("nested_dict"):
            raise ValueError(f"{path}: the saved params were not nested dicts (paths {paths[:4]}...); "
                             "pass like= (a pytree of the same structure) to restore them")
        params = _rebuild_nested(paths, [jnp.asarray(x) for x in params_leaves])
        mask = _rebuild_nested(paths, [jnp.asarray(m) for m in mask_leaves])
    else:
        params, mask = _restore_like(path, like, leaves_info, params_leaves, mask_leaves, info.get("seeds"))
    return Ticket(mask=mask, params=params, metadata=info.get("metadata", {}),
                  info={k: v for k, v in info.items() if k != "metadata"})


def _restore_like(path, like, leaves_info, params_leaves, mask_leaves, seeds):
    like_paths, like_leaves, treedef = leaves_with_paths(like)
    saved = {p: i for i, (p, _, _) in enumerate(leaves_info)}
    missing = [p for p in like_paths if p not in saved]
    extra = [p for p in saved if p not in set(like_paths)]
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"leaves of like missing from the ticket: {missing[:5]}")
        if extra:
            detail.append(f"leaves in the ticket missing from like: {extra[:5]}")
        raise ValueError(f"{path}: like does not have the ticket's structure ({'; '.join(detail)})")
    params_out, mask_out = [], []
    for p, leaf in zip(like_paths, like_leaves):
        i = saved[p]
        _, shape, dtype = leaves_info[i]
        got_shape = tuple(jnp.shape(leaf))
        if got_shape != shape and not (seeds and got_shape == shape[1:]):
            raise ValueError(f"{path}: leaf {p} has shape {shape} in the ticket but {got_shape} in like")
        got_dtype = jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        if got_dtype != dtype:
            raise ValueError(f"{path}: leaf {p} has dtype {dtype.name} in the ticket but {got_dtype.name} in like")
        params_out.append(jnp.asarray(params_leaves[i]))
        mask_out.append(jnp.asarray(mask_leaves[i]))
    return jax.tree.unflatten(treedef, params_out), jax.tree.unflatten(treedef, mask_out)
