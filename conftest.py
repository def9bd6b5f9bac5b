"""Test-session set-up: a temporary dataset cache, and one JAX compilation cache shared by
every test process.

Tests and doctests never write the dataset cache into the home directory.

Most of the suite's time is XLA compilation, and many tests compile the same programs (the
same tiny models, trainers and pruning steps) in different test processes (pytest-xdist
workers, the command-line and multi-process tests' subprocesses). A persistent compilation
cache in a fresh directory per test session lets each program compile once per session; the
cache never outlives the session, so no run reuses another's programs. The directory is
handed to workers and subprocesses through ``JAX_COMPILATION_CACHE_DIR`` (they inherit the
environment). Measured here on three IMP test files: 184 s of CPU without, 95 s with.

The tests also compile with LLVM's optimisation level 0 (``--xla_backend_optimization_level=0``
added to ``XLA_FLAGS``, inherited by subprocesses and notebook kernels): XLA's own graph
optimisations (fusion, layout) still run, only the machine-code optimisation is skipped.
The suite's programs are tiny and run a few steps, so compiling is most of their time:
measured here on the conv, compaction, sparse-training-experiment and grokking tests, 341 s
of CPU at the default level, 186 s at level 0, all passing. Set
``LOTTOJAX_TEST_XLA_OPTIMIZED=1`` to test the code as users run it (the default level).
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

if not os.environ.get("LOTTOJAX_TEST_XLA_OPTIMIZED") and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lottojax-test-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

if "jax" in sys.modules:  # imported before this file (a plugin): the environment came too late
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", 0)))


@pytest.fixture(scope="session")
def cpu_devices_env():
    """``env(devices)``: this process's environment for a subprocess that sees ``devices`` CPU
    devices (the flag added to this session's ``XLA_FLAGS``, not replacing them)."""
    def env(devices: int) -> dict:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")

    return env


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache():
    previous = os.environ.get("LOTTOJAX_CACHE")
    with tempfile.TemporaryDirectory(prefix="lottojax-cache-") as path:
        os.environ["LOTTOJAX_CACHE"] = previous or path
        yield
    if previous is None:
        os.environ.pop("LOTTOJAX_CACHE", None)


@pytest.fixture
def poison_init(monkeypatch):
    """``poison(seed, module=lottojax.models, factory="create")``: models built by
    ``module.factory`` from then on start with NaN weights when initialised with ``seed``'s
    ``init`` key, and only then, so that seed's training diverges and nothing else changes
    (the experiments' divergence tests)."""
    import jax
    import jax.numpy as jnp

    import lottojax.models
    from lottojax.seeds import seed_keys

    def poison(seed: int, module=lottojax.models, factory: str = "create") -> None:
        build, target = getattr(module, factory), jax.random.key_data(seed_keys((seed,), "init"))[0]

        def poisoned(*args, **kwargs):
            model = build(*args, **kwargs)

            def init(key):
                params, state = model.init(key)
                hit = jnp.all(jax.random.key_data(key) == target)
                return jax.tree.map(lambda p: jnp.where(hit, jnp.nan, p), params), state

            return model._replace(init=init)

        monkeypatch.setattr(module, factory, poisoned)

    return poison
