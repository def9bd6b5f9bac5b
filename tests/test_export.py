"""Export of tickets: PyTorch state dicts in PyTorch's names and layouts (same logits as the
lottojax model with the masked parameters, evaluation mode), safetensors files (bitwise tensors,
metadata), the N:M compressed form (bitwise round trip), and clear errors. Tests that need torch
skip without it (CI installs no torch); the rest needs numpy and safetensors only."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottojax import __version__
from lottojax.compact import compact
from lottojax.export import (NMCompressed, compress_nm, decompress_nm, from_state_dict, load_safetensors,
                             save_safetensors, to_state_dict, torch_model)
from lottojax.masks import apply_mask
from lottojax.models import create
from lottojax.structured import prune_nm

#: (name, input shape, constructor arguments): small versions of every supported family.
CASES = {
    "mlp": ("mlp", (40,), dict(hidden=(8, 6))),
    "lenet300100": ("lenet300100", (28, 28, 1), dict(hidden=(16, 8))),
    "conv2": ("conv2", (8, 8, 3), dict(conv_widths=(4, 6), fc_widths=(8, 8))),
    "conv4": ("conv4", (9, 9, 3), dict(conv_widths=(4, 4, 5, 6), fc_widths=(7,))),
    "conv6-no-fc": ("conv6", (8, 8, 2), dict(conv_widths=(3, 3, 4, 4, 5, 5), fc_widths=())),
    "vgg11": ("vgg11", (16, 16, 3), dict(widths=(4, 4, 6, 6, 8, 8, 8, 8))),
    "vgg16": ("vgg16", (32, 32, 3), dict(widths=(2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 5, 5, 5))),
    "resnet20": ("resnet20", (8, 8, 3), dict(stage_sizes=(1, 2, 1))),
    "preresnet-odd": ("resnet20", (9, 7, 3), dict(stage_sizes=(1, 1, 1), pre_activation=True,
                                                  inner_widths=(3, 5, 7))),
    "cnn1d": ("cnn1d", (40,), dict(channels=(4, 5, 6))),
}


def random_ticket(name, input_shape, kwargs, seed=0, density=0.5, batch=3):
    """Random parameters (kernels scaled by 1/sqrt(fan-in), vectors N(0, 0.5^2) around 0 or 1 for
    BatchNorm scales), BatchNorm statistics that are not the defaults (means N(0, 0.5^2), variances
    in (0.5, 2)), a Bernoulli(density) mask on the kernels and an input batch."""
    model = create(name, input_shape=input_shape, **kwargs)
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        leaf = path[-1].key
        if x.ndim >= 2:
            return jnp.asarray(rng.normal(0, 1.5 / np.sqrt(np.prod(x.shape[:-1])), x.shape), jnp.float32)
        if leaf == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32)
        return jnp.asarray((leaf == "scale") + rng.normal(0, 0.5, x.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, params)
    state = jax.tree_util.tree_map_with_path(draw, state)
    mask = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < density) if x.ndim >= 2
                        else jnp.ones(x.shape, bool), params)
    x = rng.normal(size=(batch, *input_shape)).astype(np.float32)
    return model, params, state, mask, x


def torch_input(x):
    """lottojax's NHWC images -> PyTorch's NCHW; other inputs as they are."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


def assert_logits_close(actual, expected):
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def assert_trees_bitwise(a, b):
    a_paths = jax.tree_util.tree_flatten_with_path(a)[0]
    b_leaves = jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(a_paths, b_leaves):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


# ----------------------------------------------------------------------------------------------
# State dicts (no torch)


def test_state_dict_layouts_and_flatten_permutation():
    name, shape, kwargs = CASES["conv2"]
    _, params, state, mask, _ = random_ticket(name, shape, kwargs)
    sd = to_state_dict(name, params, mask, state)
    assert sorted(sd) == ["conv0.bias", "conv0.weight", "conv1.bias", "conv1.weight", "fc0.bias", "fc0.weight",
                          "fc1.bias", "fc1.weight", "output.bias", "output.weight"]
    assert sd["conv0.weight"].shape == (4, 3, 3, 3) and sd["conv1.weight"].shape == (6, 4, 3, 3)
    assert sd["fc0.weight"].shape == (8, 4 * 4 * 6) and sd["output.weight"].shape == (10, 8)
    assert all(v.flags.c_contiguous for v in sd.values())
    masked = apply_mask(params, mask)
    k = np.asarray(masked["conv1"]["kernel"])
    np.testing.assert_array_equal(sd["conv1.weight"], k.transpose(3, 2, 0, 1))
    # Flax flattens (h, w, c) channels-last; PyTorch (c, h, w): torch column c * 16 + p is Flax row p * 6 + c.
    fc0 = np.asarray(masked["fc0"]["kernel"])
    for p, c, o in [(0, 0, 0), (5, 3, 2), (15, 5, 7), (7, 1, 4)]:
        assert sd["fc0.weight"][o, c * 16 + p] == fc0[p * 6 + c, o]
    np.testing.assert_array_equal(sd["fc1.weight"], np.asarray(masked["fc1"]["kernel"]).T)
    # Pruned entries are exact zeros (positive zero), kept ones bitwise.
    m = np.asarray(mask["conv0"]["kernel"]).transpose(3, 2, 0, 1)
    assert np.all(sd["conv0.weight"][~m] == 0) and not np.any(np.signbit(sd["conv0.weight"][~m]))
    np.testing.assert_array_equal(sd["conv0.weight"][m], np.asarray(params["conv0"]["kernel"]).transpose(3, 2, 0, 1)[m])


def test_state_dict_batchnorm_entries_and_masks():
    name, shape, kwargs = CASES["vgg11"]
    _, params, state, mask, _ = random_ticket(name, shape, kwargs)
    sd = to_state_dict(name, params, mask, state, include_masks=True)
    bs = state["batch_stats"]
    np.testing.assert_array_equal(sd["bn3.weight"], params["bn3"]["scale"])
    np.testing.assert_array_equal(sd["bn3.bias"], params["bn3"]["bias"])
    np.testing.assert_array_equal(sd["bn3.running_mean"], bs["bn3"]["mean"])
    np.testing.assert_array_equal(sd["bn3.running_var"], bs["bn3"]["var"])
    assert sd["bn3.num_batches_tracked"].dtype == np.int64 and sd["bn3.num_batches_tracked"].shape == ()
    assert "conv0.weight" not in sd and "conv0.bias" not in sd  # VGG convolutions have no bias
    w, wm = sd["conv2.weight_orig"], sd["conv2.weight_mask"]
    assert wm.dtype == w.dtype == np.float32 and set(np.unique(wm)) <= {0.0, 1.0}
    np.testing.assert_array_equal(wm == 1, np.asarray(mask["conv2"]["kernel"]).transpose(3, 2, 0, 1))
    assert np.all(w[wm == 0] == 0)
    assert not any(k.startswith("bn") and k.endswith("_mask") for k in sd)


@pytest.mark.parametrize("case", ["mlp", "conv4", "conv6-no-fc", "vgg11", "preresnet-odd", "cnn1d"])
def test_from_state_dict_inverts_to_state_dict_bitwise(case):
    name, shape, kwargs = CASES[case]
    _, params, state, mask, _ = random_ticket(name, shape, kwargs)
    back, back_mask, back_state = from_state_dict(name, to_state_dict(name, params, mask, state, include_masks=True))
    assert_trees_bitwise(apply_mask(params, mask), back)
    assert_trees_bitwise(mask, back_mask)
    assert_trees_bitwise(state, back_state)
    plain, no_mask, _ = from_state_dict(name, to_state_dict(name, params, mask, state))
    assert no_mask is None
    assert_trees_bitwise(apply_mask(params, mask), plain)


def test_unknown_model_lists_known_ones():
    params = {"fc0": {"kernel": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    for call in (lambda: to_state_dict("lenet5", params), lambda: from_state_dict("lenet5", {}),
                 lambda: torch_model("lenet5", input_shape=(4,)),
                 lambda: save_safetensors("/nonexistent/x.safetensors", "lenet5", params)):
        with pytest.raises(ValueError, match=r"Unknown model 'lenet5'; expected one of: mlp, lenet300100, conv2, "
                                             r".*vgg16, resnet20"):
            call()


def test_state_dict_errors_name_the_problem():
    name, shape, kwargs = CASES["vgg11"]
    _, params, state, mask, _ = random_ticket(name, shape, kwargs)
    with pytest.raises(ValueError, match=r"BatchNorm: model_state\['batch_stats'\] needs bn0/mean"):
        to_state_dict(name, params, mask)
    bad_mask = {**mask, "conv1": {"kernel": jnp.ones((3, 3, 4, 5), bool)}}
    with pytest.raises(ValueError, match="conv1/kernel"):
        to_state_dict(name, params, bad_mask, state)
    mlp_name, mlp_shape, mlp_kwargs = CASES["mlp"]
    _, mlp, _, _, _ = random_ticket(mlp_name, mlp_shape, mlp_kwargs)
    seeded = jax.tree.map(lambda x: jnp.stack([x, x]), mlp)
    with pytest.raises(ValueError, match=r"leaf fc0/kernel has shape \(2, 40, 8\); expected a 2-D kernel"):
        to_state_dict("mlp", seeded)
    with pytest.raises(ValueError, match="fc0/weird fits no layer"):
        to_state_dict("mlp", {**mlp, "fc0": {**mlp["fc0"], "weird": jnp.ones(3)}})
    with pytest.raises(ValueError, match="no BatchNorm, but params has bn0/scale"):
        to_state_dict("mlp", {**mlp, "bn0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}})
    with pytest.raises(ValueError, match="fc0.bogus fits no layer"):
        from_state_dict("mlp", {**to_state_dict("mlp", mlp), "fc0.bogus": np.ones(3)})


# ----------------------------------------------------------------------------------------------
# safetensors (no torch)


def test_safetensors_round_trip(tmp_path):
    name, shape, kwargs = CASES["resnet20"]
    _, params, state, mask, _ = random_ticket(name, shape, kwargs, density=0.3)
    path = save_safetensors(tmp_path / "ticket.safetensors", name, params, mask, state,
                            metadata={"level": 7, "note": "IMP, rewind to iteration 500"})
    assert path == str(tmp_path / "ticket.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.safetensors"]  # no temporary left
    tensors, meta = load_safetensors(path)
    expected = to_state_dict(name, params, mask, state, include_masks=True)
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
        assert tensors[key].tobytes() == value.tobytes(), key
    for key in [k for k in tensors if k.endswith(".weight_mask")]:
        orig = tensors[key.replace("_mask", "_orig")]
        assert np.all(orig[tensors[key] == 0] == 0), key
    assert meta["format"] == "lottojax.export" and meta["format_version"] == "1"
    assert meta["model"] == "resnet20" and meta["lottojax_version"] == __version__
    assert meta["layout"] == "pytorch" and meta["masks"] == "weight_orig/weight_mask"
    assert meta["level"] == "7" and meta["note"] == "IMP, rewind to iteration 500"
    layers = json.loads(meta["layers"])
    kernel_masks = {path: m for path, m in zip(*_paths_and_leaves(mask)) if m.ndim >= 2}
    assert sorted(layers) == sorted(p.rpartition("/")[0].replace("/", ".") + ".weight" for p in kernel_masks)
    entry = layers["stage1_block0.shortcut_conv.weight"]
    m = np.asarray(mask["stage1_block0"]["shortcut_conv"]["kernel"])
    assert entry == {"kept": int(m.sum()), "total": m.size, "density": m.sum() / m.size}
    kept = sum(int(np.sum(m)) for m in kernel_masks.values())
    total = sum(m.size for m in kernel_masks.values())
    assert float(meta["density"]) == kept / total
    # Back to lottojax's layouts, bitwise.
    back, back_mask, back_state = from_state_dict(meta["model"], tensors)
    assert_trees_bitwise(apply_mask(params, mask), back)
    assert_trees_bitwise(mask, back_mask)
    assert_trees_bitwise(state, back_state)


def _paths_and_leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(k.key for k in p) for p, _ in flat], [np.asarray(x) for _, x in flat]


def test_safetensors_without_masks_and_metadata_errors(tmp_path):
    name, shape, kwargs = CASES["mlp"]
    _, params, _, mask, _ = random_ticket(name, shape, kwargs)
    path = save_safetensors(tmp_path / "plain.safetensors", name, params, mask, include_masks=False)
    tensors, meta = load_safetensors(path)
    assert sorted(tensors) == ["fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight", "output.bias", "output.weight"]
    assert meta["masks"] == "none"
    m = np.asarray(mask["fc1"]["kernel"]).T
    assert np.all(tensors["fc1.weight"][~m] == 0) and tensors["fc1.weight"].tobytes() == \
        to_state_dict(name, params, mask)["fc1.weight"].tobytes()
    with pytest.raises(ValueError, match="metadata key 'model' is one save_safetensors writes itself"):
        save_safetensors(tmp_path / "x.safetensors", name, params, metadata={"model": "other"})
    with pytest.raises(ValueError, match=r"metadata\['f'\] is neither a string nor JSON-serializable"):
        save_safetensors(tmp_path / "x.safetensors", name, params, metadata={"f": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors"]


# ----------------------------------------------------------------------------------------------
# N:M compressed form (no torch)


def nm_ticket(shape, n, m, axis, seed=0):
    rng = np.random.default_rng(seed)
    params = {"conv0": {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)}}
    full = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    mask = prune_nm(jax.tree.map(jnp.abs, params), full, n=n, m=m, axis=axis)
    return params, mask


@pytest.mark.parametrize("n, m, axis", [(2, 4, -2), (1, 4, -1), (4, 8, 2), (3, 3, -2)])
def test_nm_round_trip_bitwise(n, m, axis):
    params, mask = nm_ticket((3, 3, 24, 8), n, m, axis)
    packed = compress_nm(params, mask, n=n, m=m, axis=axis)
    leaf = packed["conv0"]["kernel"]
    assert isinstance(leaf, NMCompressed)
    expected_shape = list((3, 3, 24, 8))
    expected_shape[axis] = expected_shape[axis] // m * n
    assert leaf.values.shape == leaf.indices.shape == tuple(expected_shape)
    assert leaf.indices.dtype == np.uint8 and leaf.values.dtype == np.float32
    assert int(leaf.indices.max()) < m
    assert isinstance(packed["conv0"]["bias"], np.ndarray)
    dense, back_mask = decompress_nm(packed, n=n, m=m, axis=axis)
    assert_trees_bitwise(jax.tree.map(np.asarray, apply_mask(params, mask)), dense)
    assert_trees_bitwise(jax.tree.map(np.asarray, mask), back_mask)
    # The values are the kept entries, in order of position within each group.
    k = np.moveaxis(np.asarray(params["conv0"]["kernel"]), axis, -1)
    km = np.moveaxis(np.asarray(mask["conv0"]["kernel"]), axis, -1)
    np.testing.assert_array_equal(np.moveaxis(leaf.values, axis, -1).ravel(), k[km])


def test_nm_underfull_groups_are_padded_with_zeros():
    w = np.arange(1, 9, dtype=np.float32).reshape(8, 1)
    keep = np.array([0, 0, 1, 0, 0, 0, 0, 0], bool).reshape(8, 1)  # group 0 keeps 1, group 1 keeps none
    leaf = compress_nm({"w": w}, {"w": keep}, n=2, m=4)["w"]
    np.testing.assert_array_equal(leaf.values[:, 0], [0.0, 3.0, 0.0, 0.0])
    np.testing.assert_array_equal(leaf.indices[:, 0], [0, 2, 0, 1])
    dense, back_mask = decompress_nm({"w": leaf}, n=2, m=4)
    np.testing.assert_array_equal(dense["w"], np.where(keep, w, 0))
    np.testing.assert_array_equal(back_mask["w"][:, 0], [1, 0, 1, 0, 1, 1, 0, 0])  # padding marked kept


def test_nm_errors_name_the_path_and_group():
    params, mask = nm_ticket((3, 3, 8, 4), 2, 4, -2)
    bad = mask["conv0"]["kernel"].at[1, 2, 4:8, 3].set(True)
    with pytest.raises(ValueError, match=r"leaf conv0/kernel is not 2:4 along axis -2: the group \[1, 2, 4:8, 3\] "
                                         r"keeps 4 entries, more than 2 \(1 such groups\)"):
        compress_nm(params, {"conv0": {**mask["conv0"], "kernel": bad}}, n=2, m=4)
    with pytest.raises(ValueError, match=r"leaf conv0/kernel has shape \(3, 3, 8, 4\): its axis -2 has length 8, "
                                         r"not a multiple of m=3"):
        compress_nm(params, mask, n=1, m=3)
    with pytest.raises(ValueError, match=r"n=3, m=2: need integers with 1 <= n <= m"):
        compress_nm(params, mask, n=3, m=2)
    with pytest.raises(ValueError, match="conv0/kernel"):
        compress_nm(params, {"conv0": {**mask["conv0"], "kernel": jnp.ones((3, 3, 4, 8), bool)}}, n=2, m=4)
    # prunable= leaves a leaf dense.
    kept_dense = compress_nm(params, mask, n=2, m=4, prunable=False)
    assert isinstance(kept_dense["conv0"]["kernel"], np.ndarray)
    packed = compress_nm(params, mask, n=2, m=4)["conv0"]["kernel"]
    with pytest.raises(ValueError, match="leaf w: indices outside"):
        decompress_nm({"w": packed}, n=2, m=2)
    with pytest.raises(ValueError, match="leaf w: a group repeats a position"):
        decompress_nm({"w": NMCompressed(packed.values, np.zeros_like(packed.indices))}, n=2, m=4)
    with pytest.raises(ValueError, match="leaf w: values have shape"):
        decompress_nm({"w": NMCompressed(packed.values, packed.indices[..., :2])}, n=2, m=4)


# ----------------------------------------------------------------------------------------------
# PyTorch (skipped without torch)


def torch_logits(net, x):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return net(torch.from_numpy(torch_input(x))).numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_torch_model_gives_the_same_logits(case):
    pytest.importorskip("torch")
    name, shape, kwargs = CASES[case]
    model, params, state, mask, x = random_ticket(name, shape, kwargs)
    expected = model.apply(apply_mask(params, mask), state, jnp.asarray(x), False)[0]
    net = torch_model(name, input_shape=shape, **kwargs)
    assert not net.training
    result = net.load_state_dict(to_state_dict(name, params, mask, state))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert_logits_close(torch_logits(net, x), expected)
    # The pruned twin (torch.nn.utils.prune names) loads the masked export and agrees too.
    pruned = torch_model(name, input_shape=shape, pruned=True, **kwargs)
    pruned.load_state_dict(to_state_dict(name, params, mask, state, include_masks=True))
    assert_logits_close(torch_logits(pruned, x), expected)


def test_torch_state_dict_keys_and_shapes_match_export():
    pytest.importorskip("torch")
    for case in ["conv2", "vgg11", "resnet20", "cnn1d"]:
        name, shape, kwargs = CASES[case]
        _, params, state, mask, _ = random_ticket(name, shape, kwargs)
        own = torch_model(name, input_shape=shape, **kwargs).state_dict()
        exported = to_state_dict(name, params, mask, state)
        assert sorted(own) == sorted(exported), case
        assert {k: tuple(v.shape) for k, v in own.items()} == {k: v.shape for k, v in exported.items()}, case


def test_torch_pruned_model_keeps_pruned_weights_at_zero_in_training():
    torch = pytest.importorskip("torch")
    name, shape, kwargs = CASES["conv2"]
    _, params, state, mask, x = random_ticket(name, shape, kwargs)
    net = torch_model(name, input_shape=shape, pruned=True, **kwargs).train()
    net.load_state_dict(to_state_dict(name, params, mask, state, include_masks=True))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.from_numpy(torch_input(x))).square().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        net(torch.from_numpy(torch_input(x)))  # the pre-hook recomputes weight = weight_orig * weight_mask
    m = np.asarray(mask["conv1"]["kernel"]).transpose(3, 2, 0, 1)
    assert np.all(net.conv1.weight.detach().numpy()[~m] == 0)
    back, back_mask, _ = from_state_dict(name, net.state_dict())
    assert_trees_bitwise(mask, back_mask)


def test_torch_loads_safetensors_file(tmp_path):
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    name, shape, kwargs = CASES["vgg11"]
    model, params, state, mask, x = random_ticket(name, shape, kwargs)
    path = save_safetensors(tmp_path / "vgg.safetensors", name, params, mask, state)
    expected = model.apply(apply_mask(params, mask), state, jnp.asarray(x), False)[0]
    pruned = torch_model(name, input_shape=shape, pruned=True, **kwargs)
    pruned.load_state_dict(load_file(path))
    assert_logits_close(torch_logits(pruned, x), expected)
    plain = torch_model(name, input_shape=shape, **kwargs)
    plain.load_state_dict(load_safetensors(path)[0])  # weight_orig * weight_mask -> weight
    assert_logits_close(torch_logits(plain, x), expected)


@pytest.mark.parametrize("case", ["mlp", "conv2"])
def test_compacted_ticket_exports(case):
    pytest.importorskip("torch")
    name, shape, kwargs = CASES[case]
    model, params, state, mask, x = random_ticket(name, shape, kwargs, density=0.25)
    expected = model.apply(apply_mask(params, mask), state, jnp.asarray(x), False)[0]
    small = compact(name, params, mask, state, input_shape=shape)
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert size(small.params) < size(params)
    net = torch_model(name, input_shape=shape, num_classes=small.num_classes, **small.model_kwargs)
    net.load_state_dict(to_state_dict(name, small.params, small.mask, small.model_state))
    assert_logits_close(torch_logits(net, x), expected)


def test_torch_model_without_torch_says_how_to_install(monkeypatch):
    from lottojax import export

    export._torch_classes.cache_clear()
    monkeypatch.setitem(sys.modules, "torch", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'lottojax\[torch\]'"):
            torch_model("mlp", input_shape=(40,))
    finally:
        export._torch_classes.cache_clear()
