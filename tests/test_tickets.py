"""Tickets on disk: round trips (bitwise), like= restores, seed batches, corrupt files, atomicity."""
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lottojax as lj
from lottojax import tickets as T


def linen_params(seed):  # numpy's generator: jax.random's kernels are slow to compile on 2 cores
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "fc0": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), "bias": jnp.zeros(5)},
            "output": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16), "bias": jnp.arange(3)},
        }
    }


def magnitude_mask(params, fraction=0.4):
    return lj.prune_global(lj.magnitude(params), lj.ones_like(params), fraction)


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(zip(*lj.masks.leaves_with_paths(a)[:2]), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


def test_round_trip_linen_dict_is_bitwise(tmp_path):
    params = linen_params(0)
    mask = magnitude_mask(params)
    meta = {"config": {"model": "mlp", "rates": (0.2, 0.1)}, "level": np.int64(3), "seed": 0, "acc": np.float32(0.5)}
    path = T.save_ticket(tmp_path / "t.npz", mask=mask, params=params, metadata=meta)
    assert os.listdir(tmp_path) == ["t.npz"]  # no temporary left behind
    ticket = T.load_ticket(path)
    assert_bitwise_equal(params, ticket.params)
    assert_bitwise_equal(mask, ticket.mask)
    assert ticket.metadata == {"config": {"model": "mlp", "rates": [0.2, 0.1]}, "level": 3, "seed": 0, "acc": 0.5}
    # the recorded densities are lottojax's
    assert ticket.info["density"] == pytest.approx(float(lj.density(mask)))
    report = lj.layer_report(mask)
    assert {p: (d["kept"], d["total"]) for p, d in ticket.info["layers"].items()} == report
    assert [leaf["path"] for leaf in ticket.info["leaves"]] == lj.masks.leaves_with_paths(params)[0]
    assert {leaf["path"]: leaf["dtype"] for leaf in ticket.info["leaves"]}["params/output/kernel"] == "bfloat16"
    # the file is an ordinary .npz, keyed by tree path, with the JSON beside the arrays
    with np.load(path) as npz:
        assert "mask/params/fc0/kernel" in npz.files and "params/params/fc0/kernel" in npz.files
        np.testing.assert_array_equal(npz["params/params/fc0/kernel"], params["params"]["fc0"]["kernel"])
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("ticket.json"))["format"] == "lottojax.ticket"


def test_tuple_and_list_trees_need_like(tmp_path):
    params = ([jnp.ones((3, 2)), jnp.arange(2.0)], (jnp.full((2, 2), 2.0, jnp.float16),))
    mask = ([jnp.eye(3, 2, dtype=bool), jnp.ones(2, bool)], (jnp.array([[True, False], [False, False]]),))
    path = T.save_ticket(tmp_path / "t.npz", mask=mask, params=params)
    with pytest.raises(ValueError, match="not nested dicts.*like="):
        T.load_ticket(path)
    ticket = T.load_ticket(path, like=params)
    assert_bitwise_equal(params, ticket.params)
    assert_bitwise_equal(mask, ticket.mask)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert_bitwise_equal(params, T.load_ticket(path, like=abstract).params)


def test_like_restores_into_a_different_container_by_path(tmp_path):
    # An nnx.State (or any pytree) whose paths are the saved ones.
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    mask = jax.tree.map(lambda x: x > 0 if x.ndim >= 2 else jnp.ones(x.shape, bool), state)
    path = T.save_ticket(tmp_path / "nnx.npz", mask=mask, params=state)
    ticket = T.load_ticket(path, like=nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(1))))
    assert isinstance(ticket.params, type(state))
    assert_bitwise_equal(state, ticket.params)
    assert_bitwise_equal(mask, ticket.mask)


def test_stacked_seed_ticket(tmp_path):
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[linen_params(s) for s in (1, 2, 3)])
    masks = jax.tree.map(lambda *xs: jnp.stack(xs), *[magnitude_mask(linen_params(s)) for s in (1, 2, 3)])
    path = T.save_ticket(tmp_path / "seeds.npz", mask=masks, params=params, metadata={"seeds": [0, 1, 2]}, seeds=True)
    ticket = T.load_ticket(path)
    assert ticket.info["seeds"] == 3
    assert_bitwise_equal(params, ticket.params)
    assert_bitwise_equal(masks, ticket.mask)
    per_seed = [float(lj.density(jax.tree.map(lambda m: m[s], masks))) for s in range(3)]
    assert ticket.info["density"] == pytest.approx(per_seed)
    # biases (s, n) are not counted as prunable although they are 2-D once stacked
    assert set(ticket.info["layers"]) == {"params/fc0/kernel", "params/output/kernel"}
    assert ticket.info["layers"]["params/fc0/kernel"]["kept"] == [
        int(masks["params"]["fc0"]["kernel"][s].sum()) for s in range(3)]
    # like= may be one seed's tree or the stacked one
    one = linen_params(5)
    assert_bitwise_equal(params, T.load_ticket(path, like=one).params)
    assert_bitwise_equal(params, T.load_ticket(path, like=params).params)
    with pytest.raises(ValueError, match="same leading seed axis"):
        T.save_ticket(tmp_path / "bad.npz", mask=lj.ones_like(one), params=one, seeds=True)


def test_like_mismatch_names_the_path(tmp_path):
    params = linen_params(0)
    path = T.save_ticket(tmp_path / "t.npz", mask=magnitude_mask(params), params=params)
    wrong_shape = {"params": {**params["params"], "fc0": {"kernel": jnp.zeros((5, 6)), "bias": jnp.zeros(5)}}}
    with pytest.raises(ValueError, match=r"t\.npz: leaf params/fc0/kernel has shape \(6, 5\) in the ticket but \(5, 6\)"):
        T.load_ticket(path, like=wrong_shape)
    wrong_dtype = jax.tree.map(lambda x: x, params)
    wrong_dtype["params"]["output"]["kernel"] = jnp.zeros((5, 3), jnp.float32)
    with pytest.raises(ValueError, match="params/output/kernel has dtype bfloat16 in the ticket but float32"):
        T.load_ticket(path, like=wrong_dtype)
    missing = {"params": {"fc0": params["params"]["fc0"]}}
    with pytest.raises(ValueError, match=r"missing from like: \['params/output/bias', 'params/output/kernel'\]"):
        T.load_ticket(path, like=missing)
    extra = {"params": {**params["params"], "fc1": {"kernel": jnp.zeros((2, 2))}}}
    with pytest.raises(ValueError, match=r"missing from the ticket: \['params/fc1/kernel'\]"):
        T.load_ticket(path, like=extra)


def test_save_errors(tmp_path):
    params = linen_params(0)
    mask = magnitude_mask(params)
    bad = jax.tree.map(lambda m: m, mask)
    bad["params"]["fc0"]["kernel"] = jnp.ones((5, 6), bool)
    with pytest.raises(ValueError, match="params/fc0/kernel has shape"):
        T.save_ticket(tmp_path / "t.npz", mask=bad, params=params)
    not_bool = jax.tree.map(lambda m: m.astype(jnp.float32), mask)
    with pytest.raises(ValueError, match="params/fc0/bias has dtype float32"):
        T.save_ticket(tmp_path / "t.npz", mask=not_bool, params=params)
    with pytest.raises(ValueError, match="not JSON-serializable"):
        T.save_ticket(tmp_path / "t.npz", mask=mask, params=params, metadata={"fn": print})
    clash = {"a/b": jnp.ones((2, 2)), "a": {"b": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="share the path 'a/b'"):
        T.save_ticket(tmp_path / "t.npz", mask=lj.ones_like(clash), params=clash)
    assert os.listdir(tmp_path) == []  # nothing written by a failed save


def test_killed_save_keeps_the_old_ticket(tmp_path, monkeypatch):
    params = linen_params(0)
    path = T.save_ticket(tmp_path / "t.npz", mask=magnitude_mask(params), params=params, metadata={"v": 1})
    calls = []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill during the write
        return real(*args, **kwargs)

    real = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        T.save_ticket(path, mask=lj.ones_like(params), params=params, metadata={"v": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["t.npz"]
    ticket = T.load_ticket(path)
    assert ticket.metadata == {"v": 1}
    assert_bitwise_equal(magnitude_mask(params), ticket.mask)


def _rewrite(src, dst, *, drop=(), replace=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            data = zin.read(name)
            if replace and name in replace:
                data = replace[name](data)
            zout.writestr(name, data)


def test_corrupt_or_foreign_files_name_the_file_and_path(tmp_path):
    params = linen_params(0)
    good = T.save_ticket(tmp_path / "good.npz", mask=magnitude_mask(params), params=params)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="garbage.npz is not a lottojax ticket"):
        T.load_ticket(garbage)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(good, "rb").read()[:-200])
    with pytest.raises(ValueError, match="truncated.npz"):
        T.load_ticket(truncated)

    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.ones(3))
    with pytest.raises(ValueError, match="plain.npz is not a lottojax ticket: it has no ticket.json"):
        T.load_ticket(plain)

    no_leaf = tmp_path / "no_leaf.npz"
    _rewrite(good, no_leaf, drop={"mask/params/output/kernel.npy"})
    with pytest.raises(ValueError, match="no_leaf.npz: the leaf mask/params/output/kernel.npy .* is missing"):
        T.load_ticket(no_leaf)

    reshaped = tmp_path / "reshaped.npz"
    def lie_about_shape(data):
        info = json.loads(data)
        info["leaves"][0]["shape"] = [7]
        return json.dumps(info)
    _rewrite(good, reshaped, replace={"ticket.json": lie_about_shape})
    first = json.loads(zipfile.ZipFile(good).read("ticket.json"))["leaves"][0]["path"]
    with pytest.raises(ValueError, match=f"reshaped.npz: params/{first}.npy has shape"):
        T.load_ticket(reshaped)

    future = tmp_path / "future.npz"
    _rewrite(good, future, replace={"ticket.json": lambda d: json.dumps({**json.loads(d), "version": 99})})
    with pytest.raises(ValueError, match="future.npz is ticket format version 99"):
        T.load_ticket(future)

    bad_json = tmp_path / "bad_json.npz"
    _rewrite(good, bad_json, replace={"ticket.json": lambda d: d[:10]})
    with pytest.raises(ValueError, match="bad_json.npz: ticket.json is not valid JSON"):
        T.load_ticket(bad_json)

    with pytest.raises(FileNotFoundError, match="no ticket at"):
        T.load_ticket(tmp_path / "absent.npz")
