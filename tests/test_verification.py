"""Ownership verification primitives: connectivity maps, windows, embedding, extraction,
bit errors, QR round trips and trigger sets."""
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lottojax.optim import masked_updates
from lottojax.verification import (
    Placement,
    Signature,
    TriggerSet,
    best_window,
    bit_error,
    bit_signature,
    connectivity,
    embed_signature,
    extract_signature,
    locate_signature,
    mix_trigger,
    trigger_set,
    with_fixed_cells,
    with_trigger,
)


def random_mask(seed, shape, density):
    return np.random.default_rng(seed).random(shape) < density


def window_of(leaf, at, shape):
    """The kernel entries ``(..., in, out)`` under a connectivity window, as a bool array."""
    inside = np.zeros(leaf.shape, bool)
    inside[..., at.col:at.col + shape[1], at.row:at.row + shape[0]] = True
    return inside


# connectivity --------------------------------------------------------------------------------

def test_connectivity_of_a_hand_made_conv_and_dense_mask():
    conv = np.zeros((2, 3, 3, 2), bool)  # (kh, kw, in=3, out=2)
    conv[1, 2, 0, 1] = True  # in 0 -> out 1 through one tap
    conv[0, 0, 2, 1] = conv[1, 1, 2, 1] = True  # in 2 -> out 1 through two taps
    expected = [[False, False, False], [True, False, True]]  # (out, in)
    assert connectivity(conv).tolist() == expected
    assert jax.jit(connectivity)(conv).tolist() == expected
    dense = np.array([[True, False], [False, False], [True, True]])  # (in=3, out=2)
    assert connectivity(dense).tolist() == dense.T.tolist()


@pytest.mark.parametrize("bad, message", [(np.ones((2, 2)), "must be bool .*kernel != 0"),
                                          (np.ones(3, bool), r"ndim >= 2")])
def test_connectivity_refuses_weights_and_vectors(bad, message):
    with pytest.raises(ValueError, match=message):
        connectivity(bad)


# windows -------------------------------------------------------------------------------------

def test_a_code_planted_in_a_random_map_is_found_with_full_agreement():
    rng = np.random.default_rng(0)
    maps, codes, spots = [], [], [(3, 17), (0, 0), (22, 9)]
    for row, col in spots:
        cmap = rng.random((30, 40)) < 0.5
        code = rng.random((8, 8)) < 0.5
        cmap[row:row + 8, col:col + 8] = code
        maps.append(cmap)
        codes.append(code)
    found = jax.jit(jax.vmap(best_window))(np.stack(maps), np.stack(codes))
    assert found.row.tolist() == [r for r, _ in spots] and found.col.tolist() == [c for _, c in spots]
    assert found.agreement.tolist() == [1.0, 1.0, 1.0]


def test_best_window_counts_only_the_given_cells_and_takes_the_first_tie():
    cmap = np.zeros((3, 3), bool)
    code = np.array([[True, False]])
    cells = np.array([[False, True]])  # only the 0 counts: every offset agrees
    window = best_window(cmap, code, cells=cells)
    assert (int(window.row), int(window.col), float(window.agreement)) == (0, 0, 1.0)
    assert float(best_window(cmap, code).agreement) == 0.5


def test_locate_signature_picks_the_best_prunable_layer():
    code = np.array([[True, False], [False, True]])
    mask = {"a": {"kernel": np.zeros((3, 4, 4), bool)}, "b": {"kernel": np.zeros((5, 5), bool), "bias": np.ones(5, bool)},
            "small": {"kernel": np.ones((1, 1), bool)}}
    mask["b"]["kernel"][2, 1] = mask["b"]["kernel"][3, 2] = True  # out 1 <- in 2, out 2 <- in 3
    assert locate_signature(mask, code) == Placement("b/kernel", 1, 2, 1.0)
    with pytest.raises(ValueError, match=r"at least \(2, 2\); the maps are \{'small/kernel': \(1, 1\)\}"):
        locate_signature({"small": {"kernel": np.ones((1, 1), bool)}}, code)


# embedding -----------------------------------------------------------------------------------

def conv_case(seed, density):
    """A two-layer mask (a conv kernel and a dense one), magnitude scores and a code."""
    rng = np.random.default_rng(seed)
    mask = {"conv": {"kernel": random_mask(seed, (3, 12, 10), density)},
            "fc": {"kernel": random_mask(seed + 1, (10, 6), 0.5), "bias": np.ones(6, bool)}}
    scores = jax.tree.map(lambda m: rng.random(m.shape).astype(np.float32), mask)
    code = rng.random((6, 7)) < 0.5
    return mask, scores, code


@pytest.mark.parametrize("seed, density", [(0, 0.05), (1, 0.6), (2, 0.25)])  # gains, losses, either
def test_embedding_keeps_the_exact_count_and_touches_only_the_window_and_the_rebalanced_entries(seed, density):
    mask, scores, code = conv_case(seed, density)
    at = Placement("conv/kernel", 2, 3, 0.0)
    new = embed_signature(mask, scores, code, at=at)
    kernel, new_kernel = mask["conv"]["kernel"], np.asarray(new["conv"]["kernel"])
    count = lambda m: int(m["conv"]["kernel"].sum() + m["fc"]["kernel"].sum())
    assert count(jax.tree.map(np.asarray, new)) == count(mask)
    np.testing.assert_array_equal(new["fc"]["bias"], mask["fc"]["bias"])
    # The window reads the code; a gained cell keeps exactly its highest-scoring tap.
    assert np.array_equal(extract_signature(new, at=at, shape=code.shape), code)
    inside = window_of(kernel, at, code.shape)
    region = lambda x: np.transpose(x, (2, 1, 0))[2:8, 3:10]  # (out, in, taps) of the window
    present = region(kernel).any(-1)
    gained_cells = code & ~present
    taps = region(new_kernel)[gained_cells]
    assert (taps.sum(-1) == 1).all()
    assert (taps.argmax(-1) == region(scores["conv"]["kernel"])[gained_cells].argmax(-1)).all()
    assert np.array_equal(region(new_kernel)[code & present], region(kernel)[code & present])
    # Outside the window exactly |gained| entries changed, the ones the scores single out.
    gained = int(new_kernel[inside].sum()) - int(kernel[inside].sum())
    before = np.concatenate([kernel[~inside], mask["fc"]["kernel"].ravel()])
    after = np.concatenate([new_kernel[~inside], np.asarray(new["fc"]["kernel"]).ravel()])
    score = np.concatenate([scores["conv"]["kernel"][~inside], scores["fc"]["kernel"].ravel()])
    changed = before != after
    assert changed.sum() == abs(gained) and gained != 0
    if gained > 0:  # the lowest-scoring kept entries went
        assert before[changed].all() and score[changed].max() <= score[before & ~changed].min()
    else:  # the highest-scoring pruned entries came back
        assert not before[changed].any() and score[changed].min() >= score[~before & ~changed].max()


def test_the_reference_rule_rebalances_only_losses_and_only_inside_the_window():
    for seed, density in ((1, 0.6), (0, 0.05)):
        mask, scores, code = conv_case(seed, density)
        at = Placement("conv/kernel", 2, 3, 0.0)
        kernel = mask["conv"]["kernel"]
        inside = window_of(kernel, at, code.shape)
        new = jax.tree.map(np.asarray, embed_signature(mask, scores, code, at=at, rebalance="window"))
        plain = jax.tree.map(np.asarray, embed_signature(mask, scores, code, at=at, rebalance="none"))
        np.testing.assert_array_equal(new["conv"]["kernel"][~inside], kernel[~inside])
        np.testing.assert_array_equal(new["fc"]["kernel"], mask["fc"]["kernel"])
        np.testing.assert_array_equal(extract_signature(new, at=at, shape=code.shape), code)
        change = int(plain["conv"]["kernel"].sum()) - int(kernel.sum())
        restored = int(new["conv"]["kernel"].sum()) - int(plain["conv"]["kernel"].sum())
        if change > 0:
            assert restored == 0  # gains are never undone: density drifts up
        else:  # losses are refilled from kernels whose code and map were both 1, as far as they go
            assert 0 < restored <= -change
            assert (new["conv"]["kernel"] >= plain["conv"]["kernel"]).all()


def test_cells_left_out_are_not_written():
    mask, scores, code = conv_case(0, 0.25)
    at = Placement("conv/kernel", 0, 0, 0.0)
    cells = np.zeros_like(code)
    cells[1:3, 2:5] = True
    new = embed_signature(mask, scores, code, at=at, cells=cells, rebalance="none")
    before = np.asarray(extract_signature(mask, at=at, shape=code.shape))
    after = np.asarray(extract_signature(new, at=at, shape=code.shape))
    assert np.array_equal(after[cells], code[cells]) and np.array_equal(after[~cells], before[~cells])


def test_embedding_under_jit_with_a_traced_window_matches_eager():
    mask, scores, code = conv_case(2, 0.25)
    eager = embed_signature(mask, scores, code, at=Placement("conv/kernel", 3, 1, 0.0))
    traced = jax.jit(lambda m, s, r, c: embed_signature(m, s, code, at=Placement("conv/kernel", r, c, 0.0)))(
        mask, scores, jnp.int32(3), jnp.int32(1))
    jax.tree.map(np.testing.assert_array_equal, eager, traced)
    read = jax.jit(lambda m, r, c: extract_signature(m, at=Placement("conv/kernel", r, c, 0.0), shape=code.shape))
    np.testing.assert_array_equal(read(traced, jnp.int32(3), jnp.int32(1)), code)


@pytest.mark.parametrize("kwargs, message", [
    (dict(at=Placement("nope", 0, 0, 0.0)), r"no mask leaf 'nope'; the leaves are \['conv/kernel', 'fc/bias', "),
    (dict(at=Placement("conv/kernel", 5, 0, 0.0)), r"row=5: the window of \(6, 7\) must start in \[0, 4\]"),
    (dict(at=Placement("conv/kernel", 0, 0, 0.0), rebalance="global"), "rebalance='global' unknown"),
    (dict(at=Placement("fc/kernel", 0, 0, 0.0), transpose=True),
     r"the code \(7, 6\) does not fit the connectivity map \(6, 10\) of fc/kernel"),
    (dict(at=Placement("fc/bias", 0, 0, 0.0)), "mask leaf fc/bias is not prunable"),
    (dict(at=Placement("conv/kernel", 0, 0, 0.0), cells=np.ones((2, 2), bool)), r"cells has shape \(2, 2\)"),
])
def test_embedding_errors_name_the_problem(kwargs, message):
    mask, scores, code = conv_case(0, 0.25)
    if kwargs.pop("transpose", False):
        code = code.T
    with pytest.raises(ValueError, match=message):
        embed_signature(mask, scores, code, **kwargs)


def test_embedding_refuses_scores_that_do_not_describe_the_mask():
    mask, scores, code = conv_case(0, 0.25)
    scores["fc"]["kernel"] = scores["fc"]["kernel"][:3]
    with pytest.raises(ValueError, match="fc/kernel"):
        embed_signature(mask, scores, code, at=Placement("conv/kernel", 0, 0, 0.0))


# extraction ----------------------------------------------------------------------------------

def test_extraction_from_weights_is_invariant_to_training_under_a_fixed_mask():
    mask, scores, code = conv_case(3, 0.2)
    at = Placement("conv/kernel", 1, 2, 0.0)
    mask = jax.tree.map(np.asarray, embed_signature(mask, scores, code, at=at))
    params = jax.tree.map(lambda m: jnp.where(m, 0.5, 0.0), mask)
    tx = optax.chain(optax.adam(0.1), masked_updates())
    from lottojax.optim import set_mask

    opt_state = set_mask(tx.init(params), mask)
    loss = lambda p, x: jnp.sum(jnp.tanh(jnp.einsum("kio,ni->no", p["conv"]["kernel"], x) @ p["fc"]["kernel"]) ** 2)
    x = jax.random.normal(jax.random.key(0), (4, 12))

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params, x), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    read = lambda p: extract_signature(jax.tree.map(lambda w: w != 0, p), at=at, shape=code.shape)
    start = np.asarray(read(params))
    for _ in range(5):
        params, opt_state = step(params, opt_state)
    assert np.array_equal(start, code) and np.array_equal(read(params), code)
    assert not np.allclose(params["conv"]["kernel"][mask["conv"]["kernel"]], 0.5)  # the weights did move


# bit errors and signatures -------------------------------------------------------------------

def test_bit_error_counts_data_cells_and_the_diluted_figure_divides_by_all():
    code = np.array([[True, True, False], [False, True, False]])
    data = np.array([[False, True, True], [True, True, False]])
    window = np.array([[False, False, False], [True, True, True]])  # differs at (0,0) (0,1) (1,0) (1,2)
    assert float(bit_error(window, code, data)) == 0.5  # (0,1) and (1,0) of 4 data cells
    assert float(bit_error(window, code, data, diluted=True)) == pytest.approx(2 / 6)
    assert float(bit_error(window, code)) == pytest.approx(4 / 6)
    batched = jax.jit(jax.vmap(partial(bit_error, code=code, data=data)))(np.stack([window, code]))
    assert batched.tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="must have one shape"):
        bit_error(window[:1], code)


def test_bit_signature_and_fixed_cells():
    s = bit_signature([1, 0, 0, 1], width=2)
    assert s.code.tolist() == [[True, False], [False, True]] and s.data.all() and s.text is None
    with pytest.raises(ValueError, match="width=3 must divide the 4 bits"):
        bit_signature("1001", width=3)
    fixed = Signature(np.array([[True, False]]), np.array([[True, False]]))
    assert np.asarray(with_fixed_cells(np.array([[False, True]]), fixed)).tolist() == [[False, False]]


def test_qr_round_trip_encode_embed_extract_decode():
    pytest.importorskip("segno")
    pytest.importorskip("cv2")
    from lottojax.verification import decode_qr, qr_signature

    sig = qr_signature("owner: lottojax")
    assert sig.code.shape == (29, 29) and int(sig.data.sum()) == 566 and decode_qr(sig.code) == "owner: lottojax"
    rng = np.random.default_rng(0)
    mask = {"conv": {"kernel": rng.random((5, 40, 36)) < 0.08}, "out": {"kernel": rng.random((36, 10)) < 0.5}}
    scores = jax.tree.map(lambda m: rng.random(m.shape), mask)
    at = locate_signature(mask, sig.code)
    assert at.path == "conv/kernel"
    assert decode_qr(extract_signature(mask, at=at, shape=sig.code.shape)) is None  # not there before
    signed = embed_signature(mask, scores, sig.code, at=at)
    window = np.asarray(extract_signature(signed, at=at, shape=sig.code.shape))
    assert float(bit_error(window, sig.code, sig.data)) == 0.0 and decode_qr(window) == "owner: lottojax"
    # Only the data modules written (the reference): the raw window fails, the pasted one reads.
    data_only = embed_signature(mask, scores, sig.code, at=at, cells=sig.data)
    window = np.asarray(extract_signature(data_only, at=at, shape=sig.code.shape))
    assert float(bit_error(window, sig.code, sig.data)) == 0.0
    assert decode_qr(np.asarray(with_fixed_cells(window, sig))) == "owner: lottojax"
    with pytest.raises(ValueError, match="does not fit a version-1 QR code"):
        qr_signature("x" * 40, version=1)


# trigger sets --------------------------------------------------------------------------------

def test_trigger_set_is_deterministic_by_key_with_labels_in_range():
    a = trigger_set(jax.random.key(3), 50, (8,), num_classes=4, scale=2.0)
    b = trigger_set(jax.random.key(3), 50, (8,), num_classes=4, scale=2.0)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.y.tolist() == b.y.tolist() and set(a.y.tolist()) <= {0, 1, 2, 3} and len(set(a.y.tolist())) == 4
    assert 1.5 < float(jnp.std(a.x)) < 2.5
    with pytest.raises(ValueError, match="num_classes=1 >= 2"):
        trigger_set(jax.random.key(0), 5, (8,), num_classes=1)


class Counter(NamedTuple):
    step: jax.Array


def test_with_trigger_appends_the_next_triggers_to_every_batch_under_jit():
    trigger = TriggerSet(jnp.arange(3.0)[:, None] + 10, jnp.array([7, 8, 9]))

    def step_fn(state, x, y):  # records what it was given
        return Counter(state.step + 1), (x[:, 0], y)

    step = jax.jit(with_trigger(step_fn, trigger, per_batch=2))
    state, seen = Counter(jnp.int32(0)), []
    for _ in range(3):
        state, (x, y) = step(state, jnp.zeros((1, 1)), jnp.array([0]))
        seen.append(y.tolist())
    assert seen == [[0, 7, 8], [0, 9, 7], [0, 8, 9]]
    x, y = mix_trigger(jnp.ones((2, 1)), jnp.array([1, 1]), trigger, jnp.int32(4))
    assert x[:, 0].tolist() == [1.0, 1.0, 11.0] and y.tolist() == [1, 1, 8]
