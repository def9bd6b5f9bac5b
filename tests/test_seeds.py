"""The seed axis: vmap vs sequential map, and seeds sharded across devices and processes."""
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lottojax.seeds import map_seeds, pad_seeds

DRIVER = os.path.join(os.path.dirname(__file__), "seeded_imp_run.py")


def noisy_fn(w, key, x):
    """Per seed: a few matrix products and random draws (a stand-in for a training run)."""
    h = jnp.tanh(x @ w)
    return {"out": h @ w.T + jax.random.normal(key, x.shape), "norm": jnp.sum(h**2)}


def stacked_inputs(seeds=6):
    keys = jax.random.split(jax.random.key(0), seeds)
    ws = jax.vmap(lambda k: jax.random.normal(k, (8, 5)))(keys)
    return ws, keys, jax.random.normal(jax.random.key(1), (3, 8))


def test_map_is_bitwise_per_seed_and_vmap_agrees():
    ws, keys, x = stacked_inputs()
    by_map = jax.jit(map_seeds(noisy_fn, in_axes=(0, 0, None), strategy="map"))(ws, keys, x)
    by_vmap = jax.jit(map_seeds(noisy_fn, in_axes=(0, 0, None), strategy="vmap"))(ws, keys, x)
    single = jax.jit(noisy_fn)
    for i in range(len(ws)):
        chex.assert_trees_all_equal(jax.tree.map(lambda a: a[i], by_map), single(ws[i], keys[i], x))
    chex.assert_trees_all_close(by_map, by_vmap, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="strategy"):
        map_seeds(noisy_fn, in_axes=(0, 0, None), strategy="pmap")
    with pytest.raises(ValueError, match="in_axes"):
        map_seeds(noisy_fn, in_axes=(1, 0, None))


def test_pad_seeds_to_a_multiple_of_the_devices():
    assert pad_seeds(range(5), 8) == (0, 1, 2, 3, 4, 4, 4, 4)
    assert pad_seeds([3, 1], 2) == (3, 1)


def run_driver(env, tmp_path, name, *flags):
    """Runs the seeded IMP driver in a subprocess with environment ``env``; its saved arrays."""
    out = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, DRIVER, str(out), *flags], env=env, check=True, timeout=600,
                   capture_output=True, text=True)
    return dict(np.load(out))


def assert_same_results(a, b, *, exact):
    """``exact``: masks, densities, accuracies and early-stop steps identical, losses equal to
    float rounding (different compiled programs may sum a mean in another order). Otherwise
    masks and densities identical and the rest close."""
    for key in ("density", "mask"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ("final_accuracy", "early_stop_step", "early_stop_accuracy"):
        if exact:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], atol=0.02, err_msg=key)
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-6 if exact else 1e-3, err_msg="val_loss")


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, cpu_devices_env):
    tmp = tmp_path_factory.mktemp("unsharded")
    return {s: run_driver(cpu_devices_env(1), tmp, s, "--strategy", s) for s in ("map", "vmap")}


@pytest.mark.parametrize("strategy", ["map", "vmap"])
def test_seeds_sharded_over_8_devices_match_the_unsharded_run(tmp_path, unsharded, strategy, cpu_devices_env):
    sharded = run_driver(cpu_devices_env(8), tmp_path, "sharded", "--strategy", strategy, "--devices", "all",
                         "--checkpoint", str(tmp_path / "ckpt"))
    assert int(sharded["devices"]) == 8 and sharded["density"].shape == (3, 5)
    # 'map' runs each seed's own program wherever it is placed; 'vmap' batches 1 seed per
    # device instead of 5, so its float rounding differs.
    assert_same_results(sharded, unsharded[strategy], exact=strategy == "map")
    resumed = run_driver(cpu_devices_env(8), tmp_path, "resumed", "--strategy", strategy, "--devices", "all",
                         "--checkpoint", str(tmp_path / "ckpt"))
    assert_same_results(resumed, sharded, exact=True)


def test_outputs_are_sharded_along_the_seed_axis(cpu_devices_env):
    code = """
import jax, jax.numpy as jnp
from lottojax.seeds import map_seeds, put_seeded
f = jax.jit(map_seeds(lambda w, x: (w * x).sum(), in_axes=(0, None), strategy='map', devices='all'))
out = f(put_seeded(jnp.arange(16.).reshape(8, 2), 'all', stacked=True), jnp.ones(2))
print(out.sharding.spec, sorted(s.data.shape for s in out.addressable_shards), out.tolist())
"""
    env = cpu_devices_env(4)
    printed = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert printed.strip() == f"{PartitionSpec('seeds')} [(2,), (2,), (2,), (2,)] [1.0, 5.0, 9.0, 13.0, 17.0, 21.0, 25.0, 29.0]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_seeds_sharded_across_two_processes_match_one_process(tmp_path, unsharded, cpu_devices_env):
    port = free_port()
    env = cpu_devices_env(2)
    out = tmp_path / "multi.npz"
    procs = [
        subprocess.Popen([sys.executable, DRIVER, str(out), "--strategy", "map", "--devices", "all",
                          "--process", str(i), "--processes", "2", "--port", str(port)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    multi = dict(np.load(out))
    assert int(multi["devices"]) == 4 and int(multi["processes"]) == 2
    assert_same_results(multi, unsharded["map"], exact=True)
