"""The main job's command line end to end (tiny settings): table, results, plot, and the seeds
split over two CPU devices (``--cpu-devices 2 --devices all``), equal to the one-device run."""
import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "lottery.py")
TINY = ["--rounds", "1", "--num-steps", "60", "--eval-every", "20", "--seeds", "3"]


def run_main_job(out, *flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, SCRIPT, *TINY, "--out", str(out), *flags], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (workdir,) = [os.path.join(out, d) for d in os.listdir(out)]
    return done.stdout, workdir


def test_main_job_writes_table_results_and_plot_and_shards_seeds_over_cpu_devices(tmp_path):
    printed, workdir = run_main_job(tmp_path / "one")
    for name in ("config.json", "results.json", "results.npz", "lottery.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    levels = json.load(open(os.path.join(workdir, "results.json")))["levels"]
    assert len(levels) == 2 and "ticket" in printed and "reinit" in printed
    one = np.load(os.path.join(workdir, "results.npz"))
    assert one["density"].shape == (2, 3)

    printed, workdir = run_main_job(tmp_path / "two", "--cpu-devices", "2", "--devices", "all")
    two = np.load(os.path.join(workdir, "results.npz"))
    assert json.load(open(os.path.join(workdir, "config.json")))["devices"] == "all"
    # 3 seeds ran in 4 slots: padded to a multiple of the 2 devices
    assert json.load(open(os.path.join(workdir, "checkpoint", "run.json")))["seed_slots"] == 4
    np.testing.assert_array_equal(two["density"], one["density"])
    np.testing.assert_array_equal(two["early_stop_step"], one["early_stop_step"])
    np.testing.assert_allclose(two["history_val_loss"], one["history_val_loss"], rtol=1e-4)
