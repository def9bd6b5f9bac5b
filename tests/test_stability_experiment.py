"""The rewind-step sweep: results of a tiny run, resume after a kill, the thin main, config
errors, and the seeds split over two devices."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lottojax.experiments.stability as sweep
from lottojax.experiments.base import ConfigError
from lottojax.experiments.metrics import read_metrics
from lottojax.experiments.stability import StabilityConfig, run_stability

FLAGS = dict(dataset="idx", validation=20, widths=(8,), batch_size=20, num_steps=12, eval_every=6,
             rewind_steps=(0, 4), seeds=(0, 1), num_points=3, rounds=1, prune_rate=0.5, stats_batches=2)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_dataset(directory):
    """A learnable MNIST-format dataset: 4x4 images whose brightest of the first 3 pixels is the label."""
    x = np.random.default_rng(0).integers(0, 256, (300, 4, 4))
    y = x[:, 0, :3].argmax(1)
    for name, array in (("train-images-idx3-ubyte", x[:240]), ("train-labels-idx1-ubyte", y[:240]),
                        ("t10k-images-idx3-ubyte", x[240:]), ("t10k-labels-idx1-ubyte", y[240:])):
        write_idx(directory / name, array)
    return str(directory)


@pytest.fixture
def idx_dir(tmp_path):
    return write_dataset(tmp_path)


#: A sweep of one rewind step: run alone (clean), and with seed 1 diverging.
ALONE = {**FLAGS, "rewind_steps": (4,), "num_points": 4}


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The result of :data:`ALONE` and its data directory."""
    data_dir = write_dataset(tmp_path_factory.mktemp("idx"))
    root = str(tmp_path_factory.mktemp("alone"))
    return run_stability(StabilityConfig(data_dir=data_dir, **ALONE), root, progress=False)[0], data_dir


def test_killed_sweep_resumes_at_the_next_rewind_step_through_the_main(idx_dir, tmp_path, monkeypatch, capsys):
    main = runpy.run_path(str(Path(__file__).parents[1] / "experiments" / "stability.py"))["main"]
    config = StabilityConfig(data_dir=idx_dir, **FLAGS)
    compute, records = sweep._one_rewind_step, []

    def crash_at_second_k(config, setup, k, workdir, progress):
        if records:
            raise KeyboardInterrupt
        records.append(compute(config, setup, k, workdir, progress))
        return records[-1]

    monkeypatch.setattr(sweep, "_one_rewind_step", crash_at_second_k)
    with pytest.raises(KeyboardInterrupt):
        run_stability(config, str(tmp_path / "runs"), progress=False)

    computed = []
    monkeypatch.setattr(sweep, "_one_rewind_step", lambda *args: computed.append(args[2]) or compute(*args))
    flags = [f"--{k.replace('_', '-')}" for k in FLAGS]
    argv = ["--net", "mlp", "--data-dir", idx_dir, "--out", str(tmp_path / "runs")]
    for flag, value in zip(flags, FLAGS.values()):
        if flag == "--seeds":
            value = ",".join(map(str, value))
        argv += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    main(argv)
    assert computed == [4], "k = 0 came from the checkpoint"
    assert "dense barrier" in capsys.readouterr().out

    result, workdir = run_stability(config, str(tmp_path / "runs"), progress=False)  # all done: only reads
    assert computed == [4]
    np.testing.assert_array_equal(result.dense_barrier[0], records[0]["dense_barrier"])
    np.testing.assert_array_equal(result.imp_accuracy[0], records[0]["imp_accuracy"])

    # What the tiny run measured has the documented shapes and meaning.
    assert result.rewind_steps.tolist() == [0, 4] and result.arms == ("ticket", "reinit", "shuffle")
    np.testing.assert_allclose(result.alpha, [0, 0.5, 1])
    assert result.dense_error.shape == result.sparse_loss.shape == (2, 2, 3)
    for errors, barrier in ((result.dense_error, result.dense_barrier), (result.sparse_error, result.sparse_barrier)):
        np.testing.assert_allclose(barrier, errors.max(-1) - errors[..., [0, -1]].mean(-1), atol=1e-6)
        assert np.all(barrier >= 0)
    kernels = 16 * 8 + 8 * 3  # fc0 and output of the MLP 16-8-3
    np.testing.assert_allclose(result.density, np.round(0.5 * kernels) / kernels)
    np.testing.assert_allclose(result.level_density[:, 0], 1.0)
    assert result.imp_accuracy.shape == (2, 2, 3) and np.all((result.imp_accuracy >= 0) & (result.imp_accuracy <= 1))
    np.testing.assert_array_equal(result.dense_accuracy, result.level_accuracy[:, 0, :, 0])
    summary = json.load(open(f"{workdir}/results.json"))
    assert [row["rewind_step"] for row in summary["rewind_steps"]] == [0, 4]
    assert summary["rewind_steps"][1]["dense_barrier"]["n"] == 2
    assert set(np.load(f"{workdir}/results.npz")) >= {"dense_error", "sparse_barrier", "imp_accuracy", "arms"}
    assert (tmp_path / "runs" / workdir.split("/")[-1] / "stability.png").exists()
    units = {r["unit"] for r in read_metrics(workdir)}  # every IMP level of every rewind step
    assert units == {f"imp-k{k}-level-{level:02d}" for k in (0, 4) for level in range(2)}


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(rewind_steps=(0, 1500)), "rewind_steps"),
        (dict(rewind_steps=(5, 5)), "rewind_steps"),
        (dict(model="resnet20", widths=(8,)), "widths"),
        (dict(seeds=()), "seeds"),
        (dict(lr_drops=(0.5, 1.0)), "lr_drops"),
        (dict(rounds=0), "rounds"),
        (dict(controls=("ticket",)), "controls"),
    ],
)
def test_bad_configs_are_named_before_any_work(change, field, tmp_path):
    with pytest.raises(ConfigError) as error:
        run_stability(StabilityConfig(**change), str(tmp_path))
    assert error.value.field == field
    assert not list(tmp_path.iterdir())


def test_net_flag_is_in_the_help_and_a_bad_flag_exits_2(capsys):
    main = runpy.run_path(str(Path(__file__).parents[1] / "experiments" / "stability.py"))["main"]
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--net {mlp,cnn1d,both}" in capsys.readouterr().out
    for argv, flag in ((["--net", "resnet"], "--net"), (["--net", "cnn1d", "--prune-rate", "1.5"], "--prune-rate")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


SHARDED_SWEEP = """
import sys
import numpy as np
from lottojax.experiments.stability import StabilityConfig, run_stability
flags = dict(dataset="idx", data_dir=sys.argv[1], validation=20, widths=(8,), batch_size=20, num_steps=12,
             eval_every=6, rewind_steps=(4,), seeds=(0, 1, 2), num_points=3, rounds=1, prune_rate=0.5,
             stats_batches=2, controls=())
(sharded, _), (one, _) = (run_stability(StabilityConfig(devices=d, **flags), sys.argv[2], progress=False)
                          for d in ("all", None))
for name, value in sharded._asdict().items():
    if isinstance(value, np.ndarray) and name != "seconds":
        np.testing.assert_array_equal(value, getattr(one, name), err_msg=name)
print(sharded.dense_barrier.shape)
"""


def test_sweep_sharded_over_two_devices_matches_one_device(idx_dir, tmp_path, cpu_devices_env):
    """``devices='all'``: 3 seeds padded to 4 over 2 devices, in IMP and in the instability
    program; the padding seed is dropped and every array equals the one-device run's."""
    env = cpu_devices_env(2)
    done = subprocess.run([sys.executable, "-c", SHARDED_SWEEP, idx_dir, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("(1, 3)")


def test_one_compiled_instability_program_serves_every_rewind_step(alone, tmp_path):
    """The copies train ``T - min(k)`` steps and stop changing at ``T``: the program is
    compiled once for the whole sweep, and a later ``k`` equals a run of that ``k`` alone."""
    alone, data_dir = alone
    config = StabilityConfig(data_dir=data_dir, **{**ALONE, "rewind_steps": (0, 4)})
    before = sweep._instability._cache_size()
    both, _ = run_stability(config, str(tmp_path / "both"), progress=False)
    assert sweep._instability._cache_size() - before == 1
    np.testing.assert_allclose(both.dense_error[1], alone.dense_error[0], atol=1e-6)
    np.testing.assert_allclose(both.sparse_barrier[1], alone.sparse_barrier[0], atol=1e-6)


def test_a_diverged_seed_is_flagged_and_the_other_is_unchanged(alone, tmp_path, poison_init, capsys):
    clean, data_dir = alone
    poison_init(1)
    result, workdir = run_stability(StabilityConfig(data_dir=data_dir, **ALONE), str(tmp_path), progress=False)
    # Seed 1 started from NaN weights: NaN wherever it trained from θ0 (the reinit control draws
    # fresh weights and did not diverge); seed 0 is exactly the clean run's.
    for name, value in result._asdict().items():
        if isinstance(value, np.ndarray) and value.ndim > 1:
            seed_axis = 2 if name.startswith("level") else 1
            np.testing.assert_array_equal(np.take(value, 0, seed_axis), np.take(getattr(clean, name), 0, seed_axis),
                                          err_msg=name)
    for values in (result.dense_barrier[:, 1], result.sparse_barrier[:, 1], result.dense_error[:, 1],
                   result.sparse_loss[:, 1], result.dense_accuracy[:, 1], result.imp_accuracy[:, 1, 0],
                   result.imp_early_stop_accuracy[:, 1, 0], result.level_accuracy[:, :, 1, 0]):
        assert np.isnan(values).all()
    assert np.isfinite(result.imp_accuracy[0, 1, 1]) and np.isfinite(result.density).all()
    assert "(1 diverged)" in sweep.stability_table(result).splitlines()[1]
    row = json.load(open(f"{workdir}/results.json"))["rewind_steps"][0]
    assert row["dense_barrier"]["n"] == 1 and row["dense_barrier"]["diverged"] == 1
    assert row["dense_barrier"]["mean"] == pytest.approx(float(clean.dense_barrier[0, 0]))
    assert "leave out diverged (non-finite) seeds" in capsys.readouterr().err
