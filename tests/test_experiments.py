"""The experiment layer: CLI errors and help, run directories, resume and extension,
loading a finished run with every level's ticket, and the src layout."""
import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import lottojax as lj
from lottojax.experiments import cli
from lottojax.experiments.lottery import LotteryConfig, load_lottery, run_lottery
from lottojax.experiments.metrics import read_metrics

TINY = LotteryConfig(seeds=(3, 5), rounds=1, num_steps=40, eval_every=20, controls=("shuffle",))


def test_every_flag_has_help_and_choices_where_they_apply():
    parser = cli.build_parser(LotteryConfig)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 12, action.dest
    by_dest = {a.dest: a for a in parser._actions}
    assert set(by_dest["optimizer"].choices) == {"adam", "sgd", "momentum", "adamw"}
    assert set(by_dest["scope"].choices) == {"layerwise", "global"}
    assert set(by_dest["controls"].choices) == {"reinit", "shuffle"}


@pytest.mark.parametrize("argv, flag", [
    (["--seeds", "0"], "--seeds"), (["--rounds", "-2"], "--rounds"), (["--num-steps", "0"], "--num-steps"),
    (["--optimizer", "lion"], "--optimizer"), (["--dense-rate", "1.5"], "--dense-rate"),
    (["--rewind-step", "5000"], "--rewind-step"), (["--seeds", "1-x"], "--seeds"),
])
def test_bad_flags_exit_2_naming_the_flag_and_leave_no_directory(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(run_lottery, LotteryConfig, [*argv, "--out", str(tmp_path / "runs")], experiment="lottery")
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


def test_seeds_take_a_count_a_list_or_a_range():
    assert cli.parse_seeds("5") == (0, 1, 2, 3, 4)
    assert cli.parse_seeds("0,3,7") == (0, 3, 7)
    assert cli.parse_seeds("10-14") == (10, 11, 12, 13, 14)
    with pytest.raises(argparse.ArgumentTypeError, match="repeated"):
        cli.parse_seeds("1,1")


def test_ctrl_c_says_how_to_resume(tmp_path, capsys):
    def interrupted(config, out):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        cli.main(interrupted, LotteryConfig, ["--out", str(tmp_path)], experiment="lottery")
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and str(tmp_path) in err


def test_a_failed_run_leaves_no_directory(tmp_path):
    with pytest.raises(Exception):
        run_lottery(LotteryConfig(dataset="idx", data_dir=str(tmp_path / "missing")), str(tmp_path / "runs"),
                    progress=False)
    assert os.listdir(tmp_path / "runs") == []


def test_finished_run_loads_back_with_every_levels_ticket(tmp_path, capsys):
    result, workdir = run_lottery(TINY, str(tmp_path), progress=False)
    config, loaded = load_lottery(workdir)
    assert config == TINY
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(loaded.masks) == 2 and loaded.seeds == (3, 5)
    mask, theta = loaded.ticket(1, seed_index=0)
    assert float(lj.density(mask)) == pytest.approx(loaded.density[1, 0])
    level = loaded.level_at_density(float(loaded.density[1].mean()))
    all_seeds_mask, all_seeds_theta = loaded.ticket(level)
    path = os.path.join(str(tmp_path), "ticket.npz")
    lj.save_ticket(path, mask=all_seeds_mask, params=all_seeds_theta, seeds=True,
                   metadata={"level": level, "config": json.loads(json.dumps(config.__dict__))})
    ticket = lj.load_ticket(path)
    for a, b in zip(jax.tree.leaves((all_seeds_mask, all_seeds_theta)), jax.tree.leaves((ticket.mask, ticket.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ticket.metadata["level"] == 1
    summary = json.load(open(os.path.join(workdir, "results.json")))
    assert summary["levels"][1]["arms"]["ticket"]["early_stop_accuracy"]["n"] == 2
    # The ticket's size, seed 3's mask: MLP 40-300-100-10, dense 20% / output 10% per round.
    size = [level["ticket_size"] for level in summary["levels"]]
    kernels = 40 * 300 + 300 * 100 + 100 * 10
    assert [s["params"]["dense"] for s in size] == [kernels + 300 + 100 + 10] * 2
    assert size[1]["params"]["kept"] == 9600 + 24000 + 900 + 410  # kept kernels + every bias
    assert size[0]["flops"]["masked"] == size[0]["flops"]["dense"] == 2 * kernels
    assert size[1]["flops"]["masked"] == 2 * (9600 + 24000 + 900)
    assert size[1]["flops"]["compacted"] <= size[1]["flops"]["dense"]
    # Per-evaluation metrics: a row per level, seed, arm and evaluation, as in the history.
    rows = read_metrics(workdir)
    assert len(rows) == result.history.step.size
    last = [r for r in rows if (r["unit"], r["seed"], r["arm"]) == ("level-01", "5", "shuffle")]
    np.testing.assert_allclose([float(r["test_accuracy"]) for r in last], result.history.test_accuracy[1, 1, 1])
    assert float(last[0]["density"]) == pytest.approx(result.density[1].mean())

    again, same_dir = run_lottery(TINY, str(tmp_path), progress=True)  # finished: resumes past the end
    assert same_dir == workdir and "resuming" in capsys.readouterr().out
    np.testing.assert_array_equal(again.early_stop_accuracy, result.early_stop_accuracy)
    _, other_dir = run_lottery(TINY.__class__(**{**TINY.__dict__, "learning_rate": 0.5, "rounds": 0}), str(tmp_path),
                               progress=False)
    assert other_dir != workdir, "a changed learning rate is a new run, never the old numbers"


def test_import_from_a_folder_holding_a_clone_named_lottojax(tmp_path):
    clone = tmp_path / "lottojax"
    (clone / "src").mkdir(parents=True)
    (clone / "README.md").write_text("a clone")
    done = subprocess.run([sys.executable, "-c", "import lottojax; print(lottojax.masked_updates.__name__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "masked_updates"
