"""Sparse inference export: same logits as the masked network in every format, the measured choice, bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax import native
from lottojax.masks import apply_mask
from lottojax.models import create
from lottojax.sparse_inference import FORMATS, FUSED_GATHER_LIMIT, NETWORK_RIVALS, apply, export_inference, format_export, gather_matmul
from lottojax.timing import Timing

#: Every format that can run here ('csr' needs the native kernel, so a C++ compiler).
AVAILABLE = tuple(f for f in FORMATS if f != "csr" or native.available())

MODELS = {
    "lenet300100": dict(input_shape=(6, 6, 1), hidden=(24, 12), num_classes=5),
    "conv2": dict(input_shape=(8, 8, 1), conv_widths=(4, 6), fc_widths=(20, 10), num_classes=5),
}


def ticket(name, density=0.25, seed=0):
    """Params, a random mask at about ``density`` with a dead hidden unit, the model and its state
    (fresh copies of the arrays: tests may change them)."""
    params, mask, *rest = _ticket(name, density, seed)
    return (jax.tree.map(np.copy, params), jax.tree.map(np.copy, mask), *rest)


@functools.lru_cache(maxsize=None)
def _ticket(name, density, seed):
    kwargs = dict(MODELS[name])
    input_shape = kwargs.pop("input_shape")
    model = create(name, input_shape=input_shape, **kwargs)
    params, state = jax.jit(model.init)(jax.random.key(seed))  # jitted: one compilation, not one per eager op
    params = jax.tree.map(np.array, params)
    rng = np.random.default_rng(seed)
    mask = jax.tree.map(lambda p: rng.random(p.shape) < density if p.ndim >= 2 else np.ones(p.shape, bool), params)
    mask["fc0"]["kernel"][:, 3] = False  # unit 3 of fc0: nothing feeds it (folded)
    params["fc0"]["bias"][3] = 0.7
    return params, mask, model, state, input_shape


def masked_logits(model, params, mask, state, x):
    return jax.jit(lambda p, x: model.apply(apply_mask(p, mask), state, x, False)[0])(params, x)


def fake_measure(table):
    """``measure`` returning fixed seconds per (layer call, format): deterministic choices."""
    calls = []

    def measure(fns):
        seconds = table[len(calls)]
        calls.append(tuple(fns))
        return {fmt: Timing((seconds[fmt],) * 3, (0.0,) * 3) for fmt in fns}

    return measure, calls


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("formats", [*AVAILABLE, "auto"])
def test_exported_logits_equal_the_masked_networks_in_every_format(name, formats):
    params, mask, model, state, input_shape = ticket(name)
    exported = export_inference(name, params, mask, formats=formats, batch_size=4, repeats=1)
    dense_layers = [l for l in exported.layers if l.kind == "dense"]
    if formats != "auto":
        assert all(l.format == formats for l in dense_layers)
        assert exported.measurements == {}
    else:
        assert set(exported.measurements) == {l.path for l in dense_layers}
        assert all(set(m) == set(AVAILABLE) for m in exported.measurements.values())
    conv_format = "csr" if formats == "csr" else "dense"  # 'auto' times convolutions only given input_shape
    assert all(l.format == conv_format for l in exported.layers if l.kind == "conv")
    assert exported.compacted.kept["fc0"].size < params["fc0"]["kernel"].shape[1]  # compacted first
    for batch in (3, 700):  # 700: gather's loop path on fc0
        x = jax.random.normal(jax.random.key(batch), (batch, *input_shape))
        np.testing.assert_allclose(apply(exported, x), masked_logits(model, params, mask, state, x), rtol=1e-5, atol=1e-5)


def test_gather_runs_its_loop_on_large_products():
    params, mask, *_ = ticket("lenet300100")
    exported = export_inference("lenet300100", params, mask, formats="gather")
    fc0 = exported.weights["fc0"]
    assert 700 * fc0["index"].size > FUSED_GATHER_LIMIT >= 3 * fc0["index"].size


def test_the_nonzero_counts_and_format_bytes_follow_the_ticket():
    params, mask, *_ = ticket("lenet300100")
    for fmt in AVAILABLE:
        exported = export_inference("lenet300100", params, mask, formats=fmt)
        small = exported.compacted
        for layer in exported.layers:
            kernel = np.asarray(small.params[layer.path]["kernel"])
            assert layer.shape == kernel.shape
            assert layer.nonzero == np.count_nonzero(kernel * np.asarray(small.mask[layer.path]["kernel"]))
            if fmt == "dense":
                assert layer.bytes == 4 * (kernel.size + kernel.shape[1])
            if fmt == "bcoo":
                assert layer.bytes == 12 * max(layer.nonzero, 1) + 4 * kernel.shape[1]


def test_auto_picks_the_fastest_measured_candidate_per_layer():
    params, mask, model, state, input_shape = ticket("conv2")
    table = [{"dense": 5.0, "bcsr": 2.0, "bcoo": 3.0, "gather": 4.0, "csr": 6.0},   # fc0
             {"dense": 1.0, "bcsr": 2.0, "bcoo": 3.0, "gather": 0.5, "csr": 6.0},   # fc1
             {"dense": 1.0, "bcsr": 1.0, "bcoo": 3.0, "gather": 4.0, "csr": 6.0}]   # output: a tie goes to the earlier candidate
    measure, calls = fake_measure(table)
    exported = export_inference("conv2", params, mask, batch_size=7, measure=measure, check_network=False)
    assert calls == [AVAILABLE] * 3  # once per dense layer, never for the convolutions
    assert exported.formats == {"conv0": "dense", "conv1": "dense", "fc0": "bcsr", "fc1": "gather", "output": "dense"}
    assert exported.seconds == {layer: {f: t[f] for f in AVAILABLE} for layer, t in zip(["fc0", "fc1", "output"], table)}
    assert exported.batch_size == 7
    x = jax.random.normal(jax.random.key(0), (5, *input_shape))
    np.testing.assert_allclose(exported(x), masked_logits(model, params, mask, state, x), rtol=1e-5, atol=1e-5)
    printed = format_export(exported)
    assert "bcsr 2.00 s*" in printed and "gather 500 ms*" in printed and "dense 1.00 s*" in printed


def test_measure_gets_runnable_layers_and_may_return_seconds():
    params, mask, *_ = ticket("lenet300100")
    ran = {}

    def measure(fns):
        for fmt, fn in fns.items():
            ran.setdefault(fmt, []).append(jax.block_until_ready(fn()).shape)
        return {"dense": 3.0, "gather": 1.0}

    exported = export_inference("lenet300100", params, mask, batch_size=9, candidates=("dense", "gather"),
                                measure=measure, formats={"fc1": "bcoo"}, check_network=False)
    assert exported.formats == {"fc0": "gather", "fc1": "bcoo", "output": "gather"}
    assert set(exported.measurements) == {"fc0", "output"}
    kept = exported.compacted.kept
    assert ran["dense"] == [(9, kept["fc0"].size), (9, 5)]  # each candidate runs its layer at the batch size


@pytest.mark.parametrize("network_faster", ["chosen", *NETWORK_RIVALS])
def test_auto_exports_the_network_that_runs_fastest_as_a_whole(network_faster):
    params, mask, model, state, input_shape = ticket("lenet300100")
    ran = []

    def measure(fns):  # per layer: gather wins; whole networks: `network_faster` wins
        if "chosen" in fns:
            ran.extend((name, jax.block_until_ready(fn()).shape) for name, fn in fns.items())
            return {name: 1.0 if name == network_faster else 2.0 for name in fns}
        return {fmt: 1.0 if fmt == "gather" else 2.0 for fmt in fns}

    if network_faster in FORMATS and network_faster not in AVAILABLE:
        pytest.skip(f"the {network_faster!r} network needs the native kernel: {native.unavailable_reason()}")
    exported = export_inference("lenet300100", params, mask, batch_size=3, measure=measure, formats={"fc1": "bcoo"})
    rivals = [f for f in NETWORK_RIVALS if f in AVAILABLE]
    assert ran == [(name, (3, 5)) for name in ["chosen", *rivals]]  # each ran the whole network at the batch size
    assert exported.network_seconds == {name: 1.0 if name == network_faster else 2.0 for name in ["chosen", *rivals]}
    assert exported.network_choice == network_faster
    measured = "gather" if network_faster == "chosen" else network_faster
    assert exported.formats == {"fc0": measured, "fc1": "bcoo", "output": measured}  # a forced format stays
    marked = {"chosen": "per-layer choices 1.00 s*", "dense": "measured layers dense 1.00 s*",
              "csr": "measured layers csr 1.00 s*"}
    assert marked[network_faster] in format_export(exported) and format_export(exported).count("*") == 3
    assert set(exported.measurements) == {"fc0", "output"}  # the per-layer timings stay on record
    x = jax.random.normal(jax.random.key(0), (4, *input_shape))
    np.testing.assert_allclose(exported(x), masked_logits(model, params, mask, state, x), rtol=1e-5, atol=1e-5)
    unchecked = export_inference("lenet300100", params, mask, measure=measure, check_network=False)
    assert unchecked.network_seconds == {} and set(unchecked.formats.values()) == {"gather"}


def test_a_layer_the_ticket_prunes_entirely_still_exports():
    params, mask, model, state, input_shape = ticket("lenet300100")
    mask["output"]["kernel"] = jnp.zeros_like(mask["output"]["kernel"])
    x = jax.random.normal(jax.random.key(0), (4, *input_shape))
    for fmt in AVAILABLE:
        exported = export_inference("lenet300100", params, mask, formats=fmt)
        np.testing.assert_allclose(exported(x), masked_logits(model, params, mask, state, x), atol=1e-6)


def test_gather_matmul_matches_the_dense_product_on_both_paths():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(30, 20)) * (rng.random((30, 20)) < 0.3)
    from lottojax.sparse_inference import _pack
    packed = _pack("gather", kernel, np.zeros(20))
    for batch in (1, 500):
        x = rng.normal(size=(batch, 30)).astype(np.float32)
        np.testing.assert_allclose(gather_matmul(x, packed["index"], packed["value"]), x @ kernel, rtol=1e-5, atol=1e-5)


def test_an_unknown_format_names_the_layer_and_lists_the_candidates():
    params, mask, *_ = ticket("lenet300100")
    with pytest.raises(ValueError, match=r"formats\['fc1'\]='csc' .* layer 'fc1'.*'dense', 'bcsr', 'bcoo', 'gather', 'csr'"):
        export_inference("lenet300100", params, mask, formats={"fc1": "csc"})
    with pytest.raises(ValueError, match=r"formats='sparse' for every dense layer \(fc0, fc1, output\).*'gather'"):
        export_inference("lenet300100", params, mask, formats="sparse")
    with pytest.raises(ValueError, match=r"\['fc7'\].*\['fc0', 'fc1', 'output'\]"):
        export_inference("lenet300100", params, mask, formats={"fc7": "dense"})
    with pytest.raises(ValueError, match=r"candidates=.*\['csc'\] unknown"):
        export_inference("lenet300100", params, mask, candidates=("dense", "csc"))
    with pytest.raises(ValueError, match="batch_size=0"):
        export_inference("lenet300100", params, mask, batch_size=0)


def test_convolutions_take_only_their_formats_and_unsupported_models_are_refused():
    params, mask, *_ = ticket("conv2")
    with pytest.raises(ValueError, match=r"'conv1' is a convolution, stored as one of \('dense', 'csr'\).*\['fc0', 'fc1', 'output'\]"):
        export_inference("conv2", params, mask, formats={"conv1": "bcsr"})
    exported = export_inference("conv2", params, mask, formats="bcsr")
    assert exported.formats == {"conv0": "dense", "conv1": "dense", "fc0": "bcsr", "fc1": "bcsr", "output": "bcsr"}
    with pytest.raises(ValueError, match=r"supports the models .*'vgg11'"):
        export_inference("vgg11", params, mask)


def test_auto_skips_sparse_candidates_that_need_too_much_temporary_memory():
    params, mask, model, state, input_shape = ticket("lenet300100")
    exported = export_inference("lenet300100", params, mask, batch_size=64, max_temp_bytes=0,
                                measure=lambda fns: {f: 1.0 for f in fns})
    assert all("bcoo" in why for why in exported.skipped.values()) and set(exported.skipped) == {"fc0", "fc1", "output"}
    assert all("bcoo" not in m and "dense" in m for m in exported.measurements.values())
    assert "bcoo skipped (needs " in format_export(exported)
    assert "MiB of temporaries" in exported.skipped["fc0"]["bcoo"]


def test_compile_apply_runs_the_same_program_ahead_of_time():
    from lottojax.sparse_inference import compile_apply
    params, mask, model, state, input_shape = ticket("conv2")
    exported = export_inference("conv2", params, mask, formats="gather")
    x = jax.random.normal(jax.random.key(0), (6, *input_shape))
    np.testing.assert_allclose(compile_apply(exported, x.shape)(x), apply(exported, x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")
def test_auto_times_convolutions_given_the_input_shape():
    params, mask, model, state, input_shape = ticket("conv2")
    measure, calls = fake_measure([{"dense": 2.0, "csr": 1.0}, {"dense": 1.0, "csr": 2.0}]
                                  + [{f: 1.0 for f in FORMATS}] * 3)
    exported = export_inference("conv2", params, mask, batch_size=3, measure=measure, input_shape=input_shape,
                                check_network=False)
    assert calls[:2] == [("dense", "csr")] * 2 and calls[2:] == [FORMATS] * 3
    assert exported.formats["conv0"] == "csr" and exported.formats["conv1"] == "dense"
    x = jax.random.normal(jax.random.key(0), (5, *input_shape))
    np.testing.assert_allclose(exported(x), masked_logits(model, params, mask, state, x), rtol=1e-5, atol=1e-5)
    without_shape = export_inference("conv2", params, mask, measure=lambda fns: {f: 1.0 for f in fns})
    assert without_shape.formats["conv0"] == "dense" and "input_shape=" in without_shape.skipped["conv0"]["csr"]


def test_consecutive_csr_dense_layers_run_as_one_step():
    from lottojax.sparse_inference import _steps
    layer = lambda path, kind, fmt: (path, kind, fmt, True, False)
    layers = (layer("conv0", "conv", "csr"), layer("fc0", "dense", "csr"), layer("fc1", "dense", "csr"),
              layer("fc2", "dense", "gather"), layer("fc3", "dense", "csr"), layer("output", "dense", "csr"))
    assert [[path for path, *_ in step] for step in _steps(layers)] == [["conv0"], ["fc0", "fc1"], ["fc2"],
                                                                         ["fc3", "output"]]
