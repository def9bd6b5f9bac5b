"""The layer-tickets experiment end to end on a tiny budget (ResNet (2, 2) on a slice of
Fashion-MNIST pooled to 7x7, 3 steps, 2 seeds): outputs are written and a second call
resumes without training; scorers that remove the same blocks share one training; no block
next to downsampling is ever removed; parameters and FLOPs of every architecture match hand
counts; a bad config names its field; a seed that diverges is flagged and left out."""
import dataclasses
import json
import os

import numpy as np
import pytest

import lottojax.experiments.layer_tickets as layer_tickets
from lottojax.experiments.base import ConfigError
from lottojax.data.idx import DEBIAN_FASHION_MNIST
from lottojax.experiments.layer_tickets import LayerTicketConfig, layer_ticket_table, run_layer_tickets
from lottojax.experiments.metrics import read_metrics

# (2, 2): the removable blocks are stage0_block0, stage0_block1 and stage1_block1; removing
# 3 removes all of them, so every scorer removes the same blocks there.
TINY = LayerTicketConfig(stage_sizes=(2, 2), downsample=4, num_steps=3, eval_every=3, batch_size=16, validation=100,
                         seeds=(0, 1), scorers=("snip", "grasp-signed", "random"), counts=(1, 3), snip_batch_size=16,
                         grasp_per_class=2, timing_repeats=1)
REMOVABLE = {"stage0_block0", "stage0_block1", "stage1_block1"}


def small_data(name, **kwargs):
    """Fashion-MNIST cut to 800 training, 100 validation and 200 test images (fast tests)."""
    data = load(name, **kwargs)
    return data._replace(x_train=data.x_train[:800], y_train=data.y_train[:800], x_test=data.x_test[:200],
                         y_test=data.y_test[:200])


load = layer_tickets.load_dataset
if not DEBIAN_FASHION_MNIST.is_dir():
    pytest.skip(f"{DEBIAN_FASHION_MNIST} is absent; `apt-get install dataset-fashion-mnist` provides it",
                allow_module_level=True)


@pytest.fixture(scope="module")
def patched():
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(layer_tickets, "load_dataset", small_data)
        yield monkeypatch


@pytest.fixture(scope="module")
def run(tmp_path_factory, patched):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_layer_tickets(TINY, root, progress=False)
    return root, summary, workdir


def hand_params(stage_sizes, channels_in=1, width=16, classes=10) -> int:
    """Parameters of the post-activation CIFAR ResNet (kernels, BatchNorm scale and bias,
    the classifier's kernel and bias), counted by hand."""
    total, c = 9 * channels_in * width + 2 * width, width
    for s, n in enumerate(stage_sizes):
        out = width * 2 ** s
        for b in range(n):
            total += 9 * c * out + 9 * out * out + 4 * out
            if c != out or (s > 0 and b == 0):
                total += c * out + 2 * out  # 1x1 shortcut and its BatchNorm
            c = out
    return total + c * classes + classes


def hand_flops(stage_sizes, height=7, channels_in=1, width=16, classes=10) -> float:
    """Forward FLOPs per example (2 per multiply-add of convolutions and classifier)."""
    flops, c = 2 * height * height * 9 * channels_in * width, width
    for s, n in enumerate(stage_sizes):
        out = width * 2 ** s
        for b in range(n):
            if s > 0 and b == 0:
                height = -(-height // 2)
                flops += 2 * height * height * out * c  # the 1x1 shortcut
            flops += 2 * height * height * out * (9 * c + 9 * out)
            c = out
    return float(flops + 2 * c * classes)


def configurations(summary):
    yield "dense", 0, summary["dense"]
    for name, entry in summary["scorers"].items():
        for count, e in entry.items():
            yield name, int(count), e


def test_removed_blocks_are_removable_and_shallower_nets_are_smaller(run):
    _, summary, _ = run
    assert hand_params((2, 2)) == summary["dense"]["params"]["mean"]
    for name, count, entry in configurations(summary):
        for removed, sizes in zip(entry["removed"], entry["stage_sizes"]):
            assert len(removed) == count and set(removed) <= REMOVABLE, (name, removed)
            assert sum(sizes) == 4 - count and sizes[1] >= 1  # stage1_block0 (downsampling) always stays
            assert sizes == [2 - sum(b.startswith("stage0") for b in removed),
                             2 - sum(b.startswith("stage1") for b in removed)]
        assert entry["params"]["per_seed"] == [hand_params(s) for s in entry["stage_sizes"]], name
        assert entry["flops"]["per_seed"] == [hand_flops(s) for s in entry["stage_sizes"]], name
        if count:
            assert entry["params"]["mean"] < summary["dense"]["params"]["mean"]
            assert entry["flops"]["mean"] < summary["dense"]["flops"]["mean"]
    for tag, arch in summary["architectures"].items():
        sizes = tuple(int(s) for s in tag.split("-"))
        assert arch["params"] == hand_params(sizes) and arch["flops"] == hand_flops(sizes)
        assert arch["step_time"]["median_s"] > 0


def test_scorers_removing_the_same_blocks_share_one_training(run):
    _, summary, workdir = run
    everything = [summary["scorers"][name]["3"] for name in TINY.scorers]
    for entry in everything:  # count 3 removes every removable block, whichever the scorer
        assert entry["stage_sizes"] == [[0, 1]] * 2
        assert entry["test_accuracy"]["per_seed"] == everything[0]["test_accuracy"]["per_seed"]
    expected = {f"seed{seed}-dense" for seed in TINY.seeds}
    for name, count, entry in configurations(summary):
        expected |= {f"seed{seed}-{layer_tickets.removed_tag(r)}" for seed, r in zip(TINY.seeds, entry["removed"])}
    units = {f[:-4] for f in os.listdir(os.path.join(workdir, "units")) if f.endswith(".npz")}
    assert units == expected and "seed0-s0b0-s0b1-s1b1" in units
    assert {row["unit"] for row in read_metrics(workdir)} == units
    # The same seed trains every architecture on the same minibatches; the dense net differs
    # from the shallow ones, and a unit's record is what the summary reports.
    arrays = np.load(os.path.join(workdir, "results.npz"))
    assert arrays["units/0/s0b0-s0b1-s1b1/test_accuracy"][-1] == everything[0]["test_accuracy"]["per_seed"][0]
    assert arrays["units/1/dense/test_accuracy"][-1] == summary["dense"]["test_accuracy"]["per_seed"][1]


def test_outputs_are_written_and_a_second_call_resumes_without_training(run, patched):
    root, summary, workdir = run
    for path in ("config.json", "results.json", "results.npz", "layer_tickets.png", "table.txt"):
        assert os.path.exists(os.path.join(workdir, path)), path
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["dense"]["test_accuracy"]["mean"] == summary["dense"]["test_accuracy"]["mean"]
    table = layer_ticket_table(summary)
    assert len(table.splitlines()) == 2 + len(TINY.scorers) * len(TINY.counts) and "grasp-signed" in table
    with open(os.path.join(workdir, "table.txt")) as f:
        assert f.read() == table + "\n"
    units = os.path.join(workdir, "units")
    saved = [os.path.join(units, f) for f in os.listdir(units) if f.endswith(".npz")]
    saved += [os.path.join(workdir, f) for f in os.listdir(workdir) if f.startswith("step_times-")]
    stamps = {p: os.path.getmtime(p) for p in saved}
    train_unit, interleaved = layer_tickets._train_unit, layer_tickets.interleaved
    patched.setattr(layer_tickets, "_train_unit", lambda *a: pytest.fail("a finished unit was trained again"))
    patched.setattr(layer_tickets, "interleaved", lambda *a, **k: pytest.fail("step times were measured again"))
    try:
        again, same = run_layer_tickets(TINY, root, progress=False)
    finally:
        patched.setattr(layer_tickets, "_train_unit", train_unit)
        patched.setattr(layer_tickets, "interleaved", interleaved)
    assert same == workdir and again == summary
    assert stamps == {p: os.path.getmtime(p) for p in saved}


@pytest.mark.parametrize("change, field", [
    ({"model": "mlp"}, "model"),
    ({"stage_sizes": ()}, "stage_sizes"),
    ({"stage_sizes": (2, 0)}, "stage_sizes"),
    ({"counts": (4,)}, "counts"),  # (2, 2) has 3 removable blocks
    ({"counts": (1, 1)}, "counts"),
    ({"counts": (0,)}, "counts"),
    ({"scorers": ()}, "scorers"),
    ({"scorers": ("snip", "snip")}, "scorers"),
    ({"scorers": ("synflow",)}, "scorers"),
    ({"width": 0}, "width"),
    ({"downsample": 0}, "downsample"),
    ({"grasp_temperature": 0.0}, "grasp_temperature"),
    ({"timing_repeats": 0}, "timing_repeats"),
])
def test_bad_configs_are_named(change, field):
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(TINY, **change).check()
    assert error.value.field == field


def test_a_downsample_that_does_not_divide_the_images_leaves_nothing_behind(tmp_path, patched):
    with pytest.raises(ConfigError) as error:
        run_layer_tickets(dataclasses.replace(TINY, downsample=3), str(tmp_path), progress=False)
    assert error.value.field == "downsample" and "28x28" in str(error.value)
    assert os.listdir(tmp_path) == []


def test_a_diverged_seed_is_flagged_and_the_other_is_unchanged(run, tmp_path, patched, poison_init):
    """Seed 1 starts from NaN weights (its ``init`` key poisons the dense net's init): every
    configuration's accuracy is NaN for it, counted as diverged and left out of the mean;
    seed 0 is exactly as in the clean run."""
    _, clean, _ = run
    poison_init(1, module=layer_tickets, factory="from_linen")
    config = dataclasses.replace(TINY, scorers=("random",), counts=(3,))  # architectures the clean run compiled
    summary, _ = run_layer_tickets(config, str(tmp_path), progress=False)
    rows = [(summary["dense"], clean["dense"])]
    rows += [(summary["scorers"]["random"]["3"], clean["scorers"]["random"]["3"])]
    for row, reference in rows:
        accuracy = row["test_accuracy"]
        assert accuracy["n"] == 1 and accuracy["diverged"] == 1 and np.isnan(accuracy["per_seed"][1])
        assert accuracy["per_seed"][0] == reference["test_accuracy"]["per_seed"][0]
        assert accuracy["mean"] == pytest.approx(accuracy["per_seed"][0])
    assert "1 diverged" in layer_ticket_table(summary).splitlines()[1]


def test_the_command_line_parses_into_the_config_and_names_a_bad_flag(tmp_path, capsys, monkeypatch):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "experiments" / "layer_tickets.py"
    spec = importlib.util.spec_from_file_location("layer_tickets_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    seen = []
    monkeypatch.setattr(cli, "run_layer_tickets", lambda config, out: seen.append((config, out)) or ({}, out))
    monkeypatch.setattr(cli, "layer_ticket_table", lambda summary: "table")
    cli.main(["--scorers", "snip", "random", "--counts", "2", "--stage-sizes", "2", "2", "--seeds", "3",
              "--out", str(tmp_path)])
    config, out = seen[0]
    assert out == str(tmp_path) and config == dataclasses.replace(
        LayerTicketConfig(), scorers=("snip", "random"), counts=(2,), stage_sizes=(2, 2), seeds=(0, 1, 2))
    assert "table" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--counts", "4", "--stage-sizes", "2", "2", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "argument --counts: (4,)" in capsys.readouterr().err
