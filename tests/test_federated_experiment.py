"""The HideNseek experiment end to end on a tiny setting: files, the summary, the shared start
of the mask arms, uplink bits, resuming after a killed arm, and CLI errors."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import lottojax as lj
from lottojax.experiments.federated import FederatedConfig, federated_table, run_federated
from lottojax.federated import FEDERATED_METHODS, uplink_bits

TINY = FederatedConfig(widths=(16,), seeds=(0, 1), num_clients=5, classes_per_client=2, rounds=3, local_epochs=1,
                       synflow_rounds=3, batch_size=100, arms=("sign-mean", "sign-vote"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_federated(TINY, root, progress=False)
    return root, summary, workdir


def test_experiment_outputs(experiment):
    root, summary, workdir = experiment
    for name in ("config.json", "server.npz", "results.json", "results.npz", "federated.png", "table.txt",
                 *(f"arms/{arm}.npz" for arm in TINY.arms)):
        assert os.path.exists(os.path.join(workdir, name)), name
    server = lj.load_ticket(os.path.join(workdir, "server.npz"))
    kernels = [m for path, m in zip(*lj.masks.leaves_with_paths(server.mask)[:2]) if path.endswith("kernel")]
    total = sum(m[0].size for m in kernels)
    for seed in range(2):
        assert sum(int(m[seed].sum()) for m in kernels) == total - int(np.round(np.float32(0.8) * np.float32(total)))
    assert set(summary["arms"]) == set(TINY.arms)
    for name, arm in summary["arms"].items():
        assert arm["test_accuracy"]["n"] == 2 and arm["curve"]["round"] == [0, 1, 2, 3]
        mask0 = jax.tree.map(lambda m: m[0], server.mask)
        assert arm["uplink_bits_per_round"] == uplink_bits(FEDERATED_METHODS[name], mask0, num_clients=5)
        assert arm["uplink_bits_total"] == 3 * arm["uplink_bits_per_round"]
    # both mask arms start from θ0 ⊙ m: the same test accuracy at round 0
    curves = [summary["arms"][name]["curve"]["test_accuracy_mean"] for name in TINY.arms]
    assert curves[0][0] == curves[1][0] and curves[0][1:] != curves[1][1:]
    assert curves[0][-1] > curves[0][0] + 0.03  # sign-mean learns (14.5% from 9.7%): no magnitude changed, only signs
    with open(os.path.join(workdir, "table.txt")) as f:
        assert f.read().strip() == federated_table(summary)
    assert federated_table(summary).splitlines()[1].startswith("sign-mean")


def test_experiment_resumes_without_recomputing(experiment):
    root, summary, workdir = experiment
    files = ["server.npz"] + [os.path.join("arms", f) for f in os.listdir(os.path.join(workdir, "arms"))
                              if f.endswith(".npz")]
    stamps = {f: os.path.getmtime(os.path.join(workdir, f)) for f in files}
    os.remove(os.path.join(workdir, "arms", "sign-vote.npz"))  # a run killed before this arm
    again, same = run_federated(TINY, root, progress=False)
    assert same == workdir
    for f, t in stamps.items():
        if f != os.path.join("arms", "sign-vote.npz"):
            assert os.path.getmtime(os.path.join(workdir, f)) == t, f  # the server and finished arms reused
    redone, before = again["arms"]["sign-vote"], summary["arms"]["sign-vote"]
    assert redone["test_accuracy"] == before["test_accuracy"] and redone["curve"] == before["curve"]
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["arms"]["sign-mean"]["test_accuracy"] == summary["arms"]["sign-mean"]["test_accuracy"]


def _cli_main():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "federated.py")
    spec = importlib.util.spec_from_file_location("federated_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_refuses_bad_flags_before_writing(capsys, tmp_path):
    main = _cli_main()
    for argv, flag in ((["--density", "1.5"], "--density"), (["--arms", "fedmask"], "--arms"),
                       (["--classes-per-client", "0"], "--classes-per-client"), (["--split", "iid"], "--split"),
                       (["--lr-drops", "0.5"], "--lr-drops")):
        with pytest.raises(SystemExit) as error:
            main([*argv, "--out", str(tmp_path)])
        assert error.value.code == 2 and flag in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    from lottojax.experiments.cli import parse_config

    config, _ = parse_config(FederatedConfig, ["--split", "dirichlet", "--alpha", "0.1", "--seeds", "5"])
    assert (config.split, config.alpha, config.seeds, config.rounds) == ("dirichlet", 0.1, (0, 1, 2, 3, 4), 50)


def test_too_few_clients_for_the_classes_leaves_no_run_directory(tmp_path):
    with pytest.raises(ValueError, match="num_clients \\* classes_per_client = 8 < 10 classes"):
        run_federated(FederatedConfig(num_clients=4, seeds=(0,), rounds=1), str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_a_diverged_seed_is_flagged_and_the_other_is_unchanged(experiment, tmp_path, poison_init, capsys):
    _, clean, _ = experiment
    poison_init(1)
    summary, workdir = run_federated(dataclasses.replace(TINY, arms=("sign-mean",)), str(tmp_path), progress=False)
    arm, before = summary["arms"]["sign-mean"], clean["arms"]["sign-mean"]
    for name in ("test_accuracy", "best_test_accuracy"):  # seed 1 is NaN and counted; seed 0 as in the clean run
        assert arm[name]["n"] == 1 and arm[name]["diverged"] == 1 and np.isnan(arm[name]["per_seed"][1])
        assert arm[name]["per_seed"][0] == before[name]["per_seed"][0] == pytest.approx(arm[name]["mean"])
    with np.load(os.path.join(workdir, "results.npz")) as saved:  # the curves are seed 0's alone
        assert arm["curve"]["test_accuracy_mean"] == saved["sign-mean/test_accuracy"][0].tolist()
        assert np.isnan(saved["sign-mean/client_loss"][1]).any()
    assert "(n=1, 1 diverged)" in federated_table(summary).splitlines()[1]
    assert "leave out diverged (non-finite) seeds" in capsys.readouterr().err
