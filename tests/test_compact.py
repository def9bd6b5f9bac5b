"""Compaction of unstructured tickets: the physically smaller dense net computes the logits of the
full net with the masked parameters (evaluation mode); dead units go, constant units fold into
the next layer's bias (or BatchNorm mean) where that is exact and stay where it is not; exact
parameter, byte and FLOP counts; clear errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax.compact import compact, count, format_counts
from lottojax.masks import apply_mask
from lottojax.models import create


def set_path(tree, path, fn):
    """A copy of the nested dict ``tree`` with ``fn`` applied to the leaf at ``path``."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = set_path(tree[head], rest, fn) if rest else fn(tree[head])
    return out


def random_ticket(model, batch_shape, seed, density):
    """Random parameters (kernels N(0, 0.3^2), biases and BatchNorm scales/shifts N(0, 1)),
    BatchNorm statistics (means N(0, 1), variances in (0.5, 2)), a Bernoulli(density) mask on the
    kernels (all-True elsewhere) and an input."""
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(shape, kind):
        if kind == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
        scale = 0.3 if kind == "kernel" else 1.0
        return jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(
        lambda p, x: draw(x.shape, "kernel" if len(x.shape) >= 2 else "vector"), params)
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: draw(x.shape, "var" if p[-1].key == "var" else "vector"), state)
    mask = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < density) if x.ndim >= 2
                        else jnp.ones(x.shape, bool), params)
    x = jnp.asarray(rng.normal(size=batch_shape), jnp.float32)
    return params, state, mask, x


def kill_incoming(params, mask, layer, unit, bias_path, bias_value):
    """Prune every incoming weight of ``unit`` of ``layer`` and set its bias (or BN shift)."""
    mask = set_path(mask, f"{layer}/kernel", lambda m: m.at[..., unit].set(False))
    params = set_path(params, bias_path, lambda b: b.at[unit].set(bias_value))
    return params, mask


def only_taps(mask, layer, unit, taps):
    """Keep the outgoing weights of input channel ``unit`` of conv ``layer`` only at ``taps``
    (positions in the flattened kernel window), all of them there."""
    def edit(m):
        window = m.shape[:-2]
        flat = m.reshape(-1, *m.shape[-2:])
        keep = np.zeros(flat.shape[0], bool)
        keep[list(taps)] = True
        flat = flat.at[:, unit, :].set(jnp.asarray(keep)[:, None])
        return flat.reshape(*window, *m.shape[-2:])
    return set_path(mask, f"{layer}/kernel", edit)


def kill_outgoing(mask, layer, unit):
    """Prune every weight of (the next) ``layer`` that reads input ``unit``."""
    return set_path(mask, f"{layer}/kernel", lambda m: m.at[..., unit, :].set(False))


def check_same_logits(name, spec, params, state, mask, x, **compact_kwargs):
    model = create(name, **spec)
    small = compact(name, params, mask, state, input_shape=spec["input_shape"], **compact_kwargs)
    net = small.model(**{k: v for k, v in spec.items() if k not in ("input_shape", "num_classes")
                         and k not in small.model_kwargs})
    chex.assert_trees_all_equal_shapes(jax.eval_shape(net.init, jax.random.key(0)), (small.params, small.model_state))
    full, _ = model.apply(apply_mask(params, mask), state, x, False)
    cut, _ = net.apply(small.params, small.model_state, x, False)
    scale = max(1.0, float(jnp.abs(full).max()))
    np.testing.assert_allclose(cut, full, rtol=1e-5, atol=1e-5 * scale)
    # Pruned weights that survive the cut stay zero, and the mask says which they are.
    for p, m in zip(jax.tree.leaves(small.params), jax.tree.leaves(small.mask)):
        assert p.shape == m.shape
        assert not np.any(np.asarray(p)[~np.asarray(m)])
    return small


MLP = dict(input_shape=(12,), hidden=(8, 6), num_classes=3)


def test_mlp_dead_and_constant_units():
    params, state, mask, x = random_ticket(create("mlp", **MLP), (5, 12), seed=0, density=0.7)
    mask = kill_outgoing(mask, "fc1", 0)                                              # nothing reads fc0 unit 0
    params, mask = kill_incoming(params, mask, "fc0", 1, "fc0/bias", 0.7)             # constant relu(0.7)
    params, mask = kill_incoming(params, mask, "fc0", 2, "fc0/bias", -0.5)            # constant 0
    params, mask = kill_incoming(params, mask, "fc1", 3, "fc1/bias", 0.4)             # constant in fc1
    mask = set_path(mask, "fc1/kernel", lambda m: m.at[:, 4].set(False).at[1:3, 4].set(True))  # fed by constants only
    mask = set_path(mask, "output/kernel", lambda m: m.at[:, :].set(True))           # every fc1 unit is read
    mask = set_path(mask, "fc1/kernel", lambda m: m.at[3:, :].set(True).at[:, 3].set(False).at[3:, 4].set(False))
    small = check_same_logits("mlp", MLP, params, state, mask, x)
    assert small.folded["fc0"].tolist() == [1, 2] and small.folded["fc1"].tolist() == [3, 4]
    assert small.kept["fc0"].tolist() == [3, 4, 5, 6, 7] and small.kept["fc1"].tolist() == [0, 1, 2, 5]
    assert small.model_kwargs == {"hidden": (5, 4)}


def test_mlp_everything_dead_keeps_inert_units():
    params, state, mask, x = random_ticket(create("mlp", **MLP), (5, 12), seed=1, density=0.7)
    mask = set_path(mask, "output/kernel", lambda m: jnp.zeros_like(m))
    small = check_same_logits("mlp", MLP, params, state, mask, x)
    assert small.model_kwargs == {"hidden": (1, 1)}
    assert not any(np.any(np.asarray(m)) for m in jax.tree.leaves(small.mask) if m.ndim >= 2)


LENET = dict(input_shape=(8, 8, 1), hidden=(20, 10), num_classes=5)


@pytest.mark.parametrize("density", [0.5, 0.08])
def test_lenet_random_masks(density):
    params, state, mask, x = random_ticket(create("lenet300100", **LENET), (4, 8, 8, 1), seed=2, density=density)
    params, mask = kill_incoming(params, mask, "fc0", 0, "fc0/bias", 1.0)
    small = check_same_logits("lenet300100", LENET, params, state, mask, x)
    assert 0 in small.folded["fc0"]
    if density < 0.1:  # a sparse ticket leaves far fewer units
        assert sum(small.model_kwargs["hidden"]) < 20


CONV2 = dict(input_shape=(8, 8, 3), conv_widths=(6, 5), fc_widths=(7,), num_classes=4)


def test_conv2_folds_centre_taps_and_keeps_border_taps():
    params, state, mask, x = random_ticket(create("conv2", **CONV2), (3, 8, 8, 3), seed=3, density=0.6)
    params, mask = kill_incoming(params, mask, "conv0", 0, "conv0/bias", 0.8)
    mask = only_taps(mask, "conv1", 0, [4])                   # read at the centre tap only: exact fold
    params, mask = kill_incoming(params, mask, "conv0", 1, "conv0/bias", 0.8)
    mask = only_taps(mask, "conv1", 1, [0, 4])                # a corner tap sees padding: kept
    params, mask = kill_incoming(params, mask, "conv0", 2, "conv0/bias", -0.8)
    mask = only_taps(mask, "conv1", 2, range(9))              # constant 0: removed whatever reads it
    mask = kill_outgoing(mask, "conv1", 3)                    # nothing reads conv0 channel 3
    params, mask = kill_incoming(params, mask, "conv1", 0, "conv1/bias", 0.5)  # folds through pool + flatten
    mask = kill_outgoing(mask, "output", 0)                   # nothing reads fc0 unit 0
    small = check_same_logits("conv2", CONV2, params, state, mask, x)
    assert small.folded["conv0"].tolist() == [0, 2] and small.folded["conv1"].tolist() == [0]
    assert small.kept["conv0"].tolist() == [1, 4, 5]
    assert 0 not in small.kept["fc0"]
    assert small.model_kwargs["conv_widths"] == (3, 4)


CONV4 = dict(input_shape=(8, 8, 3), conv_widths=(4, 5, 6, 3), fc_widths=(7, 5), num_classes=4)


@pytest.mark.parametrize("name,spec", [("conv2", CONV2), ("conv4", CONV4)])
def test_conv_random_sparse_masks(name, spec):
    params, state, mask, x = random_ticket(create(name, **spec), (3, 8, 8, 3), seed=4, density=0.05)
    small = check_same_logits(name, spec, params, state, mask, x)
    widths = spec["conv_widths"] + spec["fc_widths"]
    assert sum(small.model_kwargs["conv_widths"]) + sum(small.model_kwargs["fc_widths"]) < sum(widths)


def test_conv4_constant_through_max_pool():
    params, state, mask, x = random_ticket(create("conv4", **CONV4), (3, 8, 8, 3), seed=10, density=0.6)
    params, mask = kill_incoming(params, mask, "conv1", 0, "conv1/bias", 0.9)  # max-pooled, then read by conv2
    mask = only_taps(mask, "conv2", 0, [4])
    small = check_same_logits("conv4", CONV4, params, state, mask, x)
    assert small.folded["conv1"].tolist() == [0]


VGG = dict(input_shape=(16, 16, 3), widths=(4, 6, 8, 8, 5, 8, 6, 7), num_classes=3)


@pytest.mark.parametrize("density", [0.5, 0.1])
def test_vgg_batchnorm_constants(density):
    params, state, mask, x = random_ticket(create("vgg11", **VGG), (2, 16, 16, 3), seed=5, density=density)
    params, mask = kill_incoming(params, mask, "conv0", 0, "bn0/bias", 3.0)  # relu(BN(0)) > 0
    mask = only_taps(mask, "conv1", 0, [4])                                  # folds into bn1's mean
    mask = kill_outgoing(mask, "conv1", 1)
    params, mask = kill_incoming(params, mask, "conv7", 2, "bn7/bias", 3.0)  # folds through the average pool
    small = check_same_logits("vgg11", VGG, params, state, mask, x)
    assert 0 in small.folded["conv0"] and 2 in small.folded["conv7"]
    assert 1 not in small.kept["conv0"]


RESNET = dict(input_shape=(8, 8, 3), num_classes=3)


def test_resnet20_inner_channels():
    params, state, mask, x = random_ticket(create("resnet20", **RESNET), (2, 8, 8, 3), seed=6, density=0.5)
    b = "stage0_block0"
    params, mask = kill_incoming(params, mask, f"{b}/conv0", 0, f"{b}/bn0/bias", 3.0)
    mask = only_taps(mask, f"{b}/conv1", 0, [4])                  # folds into the block's bn1 mean
    params, mask = kill_incoming(params, mask, f"{b}/conv0", 1, f"{b}/bn0/bias", 3.0)  # border taps: kept
    mask = kill_outgoing(mask, f"{b}/conv1", 2)
    mask = set_path(mask, "stage1_block1/conv1/kernel", jnp.zeros_like)  # a block with nothing left inside
    small = check_same_logits("resnet20", RESNET, params, state, mask, x)
    assert small.folded[f"{b}/conv0"].tolist() == [0]
    assert 1 in small.kept[f"{b}/conv0"] and 2 not in small.kept[f"{b}/conv0"]
    widths = small.model_kwargs["inner_widths"]
    assert len(widths) == 9 and widths[0] == 14 and widths[4] == 1
    assert small.model_kwargs["stage_sizes"] == (3, 3, 3)


def test_resnet20_random_sparse_mask():
    params, state, mask, x = random_ticket(create("resnet20", **RESNET), (2, 8, 8, 3), seed=7, density=0.01)
    small = check_same_logits("resnet20", RESNET, params, state, mask, x)
    assert sum(small.model_kwargs["inner_widths"]) < 3 * (16 + 32 + 64)


PRERESNET = dict(input_shape=(8, 8, 3), stage_sizes=(1, 1, 1), pre_activation=True, num_classes=3)


def test_preactivation_resnet_folds_only_zero_constants():
    params, state, mask, x = random_ticket(create("resnet20", **PRERESNET), (2, 8, 8, 3), seed=8, density=0.5)
    b = "stage0_block0"
    params, mask = kill_incoming(params, mask, f"{b}/conv0", 0, f"{b}/bn1/bias", 3.0)
    mask = only_taps(mask, f"{b}/conv1", 0, [4])          # no bias after conv1 to absorb it: kept
    params, mask = kill_incoming(params, mask, f"{b}/conv0", 1, f"{b}/bn1/bias", -3.0)  # constant 0: removed
    small = check_same_logits("resnet20", PRERESNET, params, state, mask, x)
    assert small.folded[f"{b}/conv0"].tolist() == [1]
    assert 0 in small.kept[f"{b}/conv0"] and small.model_kwargs["pre_activation"] is True


CNN1D = dict(input_shape=(24,), channels=(6, 5, 7), num_classes=3)


def test_cnn1d_strided_taps_depend_on_the_input_length():
    params, state, mask, x = random_ticket(create("cnn1d", **CNN1D), (3, 24), seed=9, density=0.6)
    params, mask = kill_incoming(params, mask, "conv0", 0, "bn0/bias", 3.0)
    mask = only_taps(mask, "conv1", 0, [1, 2])  # inside every window for length 12, not for every length
    small = check_same_logits("cnn1d", CNN1D, params, state, mask, x)
    assert 0 in small.folded["conv0"] and 0 not in small.kept["conv0"]
    unsure = compact("cnn1d", params, mask, state)  # input length unknown: kept
    assert 0 in unsure.kept["conv0"]
    np.testing.assert_allclose(
        unsure.model((24,)).apply(unsure.params, unsure.model_state, x, False)[0],
        create("cnn1d", **CNN1D).apply(apply_mask(params, mask), state, x, False)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Accounting


def mlp_432():
    params = {"fc0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
              "output": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    mask = {"fc0": {"kernel": jnp.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], bool), "bias": jnp.ones(3, bool)},
            "output": {"kernel": jnp.array([[1, 1], [0, 0], [1, 0]], bool), "bias": jnp.ones(2, bool)}}
    return params, mask


def test_counts_mlp_4_3_2_by_hand():
    params, mask = mlp_432()
    table = count(params, mask, name="mlp")
    # fc0: 4x3 kernel (5 kept) + 3 biases; unit 1 is read by nothing, unit 2 fed by nothing (folded).
    # CSR: 8 bytes per nonzero + 4 * (rows + 1) row pointers; biases dense.
    assert table.layers["fc0"] == (15, 8, 5, 60, 60 + 12, 20, 8 * 5 + 4 * 5 + 12, 24, 10, 8)
    assert table.layers["output"] == (8, 5, 4, 32, 32 + 6, 16, 8 * 3 + 4 * 4 + 8, 12, 6, 4)
    assert table.total == (23, 13, 9, 92, 110, 36, 120, 36, 16, 12)
    assert table.compacted.model_kwargs == {"hidden": (1,)}
    xla = table.xla_flops
    assert xla["masked"] == xla["dense"] >= 36 and xla["compacted"] < xla["dense"]
    text = format_counts(table)
    assert text.splitlines()[3].split() == ["total", "23", "13", "9", "92", "110", "36", "120", "36", "16", "12"]
    assert "XLA" in text
    dense = count(params)  # no mask, no name: dense counts, no compaction
    assert dense.total == (23, 23, None, 92, 110, None, 8 * 12 + 20 + 12 + 8 * 6 + 16 + 8, 36, 36, None)
    assert dense.xla_flops == {}


def test_counts_conv_by_hand():
    spec = dict(input_shape=(4, 4, 1), conv_widths=(2, 2), fc_widths=(3,), num_classes=2)
    params, state = create("conv2", **spec).init(jax.random.key(0))
    mask = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    mask = set_path(mask, "conv0/kernel", lambda m: m.at[..., 1].set(False))  # conv0 channel 1 fed by nothing
    mask = only_taps(mask, "conv1", 1, [4])                                   # and read at the centre only
    table = count(params, mask, name="conv2", input_shape=(4, 4, 1))
    # Per example: conv 2*kh*kw*cin*cout*16 positions (SAME, 4x4), dense 2*in*out (pool: 2x2x2 = 8 features).
    assert [table.layers[k].flops_dense for k in ("conv0", "conv1", "fc0", "output")] == [576, 1152, 48, 12]
    assert [table.layers[k].flops_masked for k in ("conv0", "conv1", "fc0", "output")] == [2 * 9 * 16, 2 * 20 * 16, 48, 12]
    assert [table.layers[k].flops_compacted for k in ("conv0", "conv1", "fc0", "output")] == [288, 576, 48, 12]
    assert table.total.flops_dense == 1788 and table.total.flops_masked == 988 and table.total.flops_compacted == 924
    assert table.total.params == 93 and table.total.nonzero == 68 and table.total.compacted == 65
    # conv1 kernel as an (18, 2) matrix with 20 nonzeros, plus 2 biases.
    assert table.layers["conv1"].bytes_csr == 8 * 20 + 4 * 19 + 8
    assert table.compacted.model_kwargs["conv_widths"] == (1, 2)
    assert table.xla_flops["compacted"] < table.xla_flops["dense"]


def test_counts_without_input_shape_leave_conv_flops_unknown():
    spec = dict(input_shape=(4, 4, 1), conv_widths=(2, 2), fc_widths=(3,), num_classes=2)
    params, _ = jax.eval_shape(create("conv2", **spec).init, jax.random.key(0))
    params = jax.tree.map(lambda p: jnp.ones(p.shape), params)
    table = count(params, name="conv2")
    assert table.layers["conv0"].flops_dense is None and table.layers["fc0"].flops_dense == 48
    assert table.total.flops_dense is None and table.total.compacted == table.total.params


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_lists_the_known_ones():
    params, mask = mlp_432()
    with pytest.raises(ValueError, match="Unknown model 'lenet5'.*mlp, lenet300100, conv2"):
        compact("lenet5", params, mask)
    with pytest.raises(ValueError, match="Unknown model 'lenet5'"):
        count(params, mask, name="lenet5")


def test_mask_mismatch_names_the_path():
    params, mask = mlp_432()
    bad = set_path(mask, "output/kernel", lambda m: m[:2])
    with pytest.raises(ValueError, match="output/kernel has shape"):
        compact("mlp", params, bad)
    missing = {"fc0": mask["fc0"]}
    with pytest.raises(ValueError, match="output/"):
        count(params, missing)


def test_other_models_params_and_missing_statistics():
    vgg_params, _ = jax.eval_shape(create("vgg11", **VGG).init, jax.random.key(0))
    vgg_params = jax.tree.map(lambda p: jnp.zeros(p.shape), vgg_params)
    with pytest.raises(ValueError, match="BatchNorm: compact needs its model_state"):
        compact("vgg11", vgg_params, jax.tree.map(lambda p: jnp.ones(p.shape, bool), vgg_params))
    params, mask = mlp_432()
    with pytest.raises(ValueError, match="not those of model 'vgg11'.*conv0/kernel"):
        compact("vgg11", params, mask, {"batch_stats": {}})
