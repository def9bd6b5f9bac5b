"""The SuperTickets experiment end to end on a tiny budget: outputs are written and a second
call resumes; inside the run every pruning event reaches exactly the scheduled density;
channel removal makes the network (and its FLOPs) smaller; the FLOP bookkeeping matches
hand counts of the CNN1D's kernels."""
import dataclasses
import json
import os

import numpy as np
import pytest

from lottojax.experiments.metrics import read_metrics
from lottojax.experiments.supertickets import SuperTicketsConfig, run_supertickets, supertickets_table

# A strong penalty and a loose threshold so that channels go within 3 epochs: pruning after
# epochs 2 and 4, removal after epoch 3 (both joint arms see the same net up to there).
TINY = SuperTicketsConfig(widths=(8, 8), seeds=(0,), epochs=4, penalty=20.0, warmup_epochs=1, threshold=0.2,
                          remove_every=2, remove_start=3, remove_stop=3, prune_every=2, prune_step=0.4,
                          target_sparsity=0.8, pipeline_epochs=(4, 1, 1), arms=("joint", "joint-keep", "pipeline"))
LENGTHS = (20, 10)  # MNIST-1D's 40 samples after each stride-2 convolution


def kernel_flops(widths) -> float:
    """Dense forward FLOPs of CNN1D (kernel 5) with these widths, counted by hand."""
    inputs = (1, *widths[:-1])
    convs = sum(2 * 5 * cin * cout * length for cin, cout, length in zip(inputs, widths, LENGTHS))
    return float(convs + 2 * LENGTHS[-1] * widths[-1] * 10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_supertickets(TINY, root, progress=False)
    return root, summary, workdir


def test_every_pruning_event_reaches_the_scheduled_density(run):
    _, summary, workdir = run
    arms = summary["arms"]
    assert summary["final_sparsity"] == 0.8
    for name in TINY.arms:
        events = np.array(arms[name]["prune_events"][0])
        epochs, targets, before, kept, total = events.T
        expected_epochs = [1, 3] if name != "pipeline" else [4]  # joint: after epochs 2 and 4; pipeline: one shot
        assert epochs.tolist() == expected_epochs, name
        exact = total - np.round(targets * total)
        # Exactly the schedule's count, unless the mask already pruned more (nothing regrows).
        np.testing.assert_array_equal(kept, np.minimum(before, exact), err_msg=name)
        assert targets[-1] == 0.8 and arms[name]["density"]["per_seed"][0] == pytest.approx(kept[-1] / total[-1])
    # With reactivation the rebuilt layers came back dense at the removal, so the second event
    # starts denser and still lands exactly on the schedule.
    joint, keep = (np.array(arms[n]["prune_events"][0]) for n in ("joint", "joint-keep"))
    assert joint[1, 2] > keep[1, 2] and joint[1, 3] == joint[1, 4] - np.round(0.8 * joint[1, 4])


def test_flops_fall_at_removal_events_and_match_hand_counts(run):
    _, summary, workdir = run
    arrays = np.load(os.path.join(workdir, "results.npz"))
    for name in TINY.arms:
        removals = np.array(summary["arms"][name]["removal_events"][0])
        assert len(removals) == 1, name  # the penalty removes channels at the single removal event
        epoch, before, after = removals[0]
        assert epoch == (2 if name != "pipeline" else 3)
        assert after < before
        widths = arrays[f"{name}/seed0/epoch_widths"]
        dense = arrays[f"{name}/seed0/epoch_dense_flops"]
        assert dense.tolist() == [kernel_flops(w) for w in widths.tolist()], name
        assert before == kernel_flops(TINY.widths) and dense[int(epoch)] == after
        assert widths[int(epoch)].sum() < sum(TINY.widths) and (widths[-1] <= widths[int(epoch)]).all()
        # Training FLOPs: 3x the forward FLOPs of the network during the epoch, per example trained.
        per_epoch = arrays[f"{name}/seed0/epoch_train_flops"]
        examples = 3 * (3500 // TINY.batch_size) * TINY.batch_size
        assert per_epoch[0] == examples * kernel_flops(TINY.widths)
        assert summary["arms"][name]["train_flops"]["mean"] == pytest.approx(per_epoch.sum())
    assert "joint-keep" in supertickets_table(summary)


def test_outputs_are_written_and_a_second_call_resumes(run):
    root, summary, workdir = run
    for path in ("config.json", "results.json", "results.npz", "supertickets.png", "arms/joint/seed0.npz",
                 "arms/pipeline/seed0.npz"):
        assert os.path.exists(os.path.join(workdir, path)), path
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["arms"]["joint"]["accuracy"] == summary["arms"]["joint"]["accuracy"]
    units = {row["unit"] for row in read_metrics(workdir)}
    assert units == {f"{name}-seed0" for name in TINY.arms}
    stamps = {name: os.path.getmtime(os.path.join(workdir, "arms", name, "seed0.npz")) for name in TINY.arms}
    again, same = run_supertickets(TINY, root, progress=False)
    assert same == workdir and again == summary
    assert stamps == {name: os.path.getmtime(os.path.join(workdir, "arms", name, "seed0.npz")) for name in TINY.arms}


def test_a_diverged_seed_is_flagged_and_the_other_is_unchanged(run, tmp_path, poison_init):
    """Seed 1 starts from NaN weights: its arm stops at the first epoch, is NaN in the
    results and counted; seed 0's figures equal the clean run's."""
    from lottojax.experiments import supertickets

    _, clean, _ = run
    poison_init(1, module=supertickets)
    config = dataclasses.replace(TINY, seeds=(0, 1), arms=("joint",))
    summary, _ = run_supertickets(config, str(tmp_path), progress=False)
    accuracy = summary["arms"]["joint"]["accuracy"]
    assert accuracy["diverged"] == 1 and accuracy["n"] == 1 and np.isnan(accuracy["per_seed"][1])
    assert accuracy["per_seed"][0] == clean["arms"]["joint"]["accuracy"]["per_seed"][0]
    assert summary["arms"]["joint"]["epochs"] == [TINY.epochs, 1]  # the diverged seed stopped at once
    assert "(1 diverged)" in supertickets_table(summary).splitlines()[1]
