"""The verification experiment end to end on a tiny budget: the signature is embedded at the
exact kept count and read back intact, the controls are measured, outputs are written and
a second call resumes."""
import json
import os

import numpy as np
import pytest

from lottojax.experiments.base import ConfigError
from lottojax.experiments.verification import MODELS, VerificationConfig, run_verification, verification_table

TINY = VerificationConfig(model="mlp", widths=(32, 32), keep_dense=("output",), signature="bits", seeds=(0, 1),
                          rounds=1, prune_rate=0.5, num_steps=40, rewind_step=5, eval_every=20, finetune_steps=10,
                          trigger_size=10, attacks=("none", "finetune", "prune20"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    summary, workdir = run_verification(TINY, root, progress=False)
    return root, summary, workdir


def test_the_signature_is_embedded_at_the_exact_count_and_survives_fine_tuning(run):
    _, summary, _ = run
    for record in summary["embedding"]:
        assert record["path"] in ("fc0/kernel", "fc1/kernel")  # maps (32, 40) and (32, 32)
        assert record["kept_after"] == record["kept_before"]
        assert record["cells_changed"] > 0
    for attack in ("none", "finetune"):
        assert summary["attacks"][attack]["bit_error"]["per_seed"] == [0.0, 0.0]
    assert summary["attacks"]["prune20"]["bit_error"]["n"] == 2
    assert summary["independent"]["bit_error"]["mean"] > 0.1
    assert len(summary["independent"]["placements"]) == 2 and "decoded" not in summary["attacks"]["none"]


def test_outputs_are_written_and_a_second_call_resumes(run):
    root, summary, workdir = run
    for name in ("config.json", "results.json", "results.npz", "table.txt", "verification.png", "imp",
                 *(f"models/{m}.npz" for m in MODELS)):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["attacks"] == json.loads(json.dumps(summary["attacks"]))
    with np.load(os.path.join(workdir, "results.npz")) as saved:
        assert np.array_equal(saved["window/none/0"], saved["code"])
    stamps = {m: os.path.getmtime(os.path.join(workdir, "models", f"{m}.npz")) for m in MODELS}
    again, same = run_verification(TINY, root, progress=False)
    assert same == workdir and again["attacks"] == summary["attacks"]
    assert stamps == {m: os.path.getmtime(os.path.join(workdir, "models", f"{m}.npz")) for m in MODELS}
    rows = [line.split()[0] for line in verification_table(summary).splitlines()[3:]]
    assert rows == [*TINY.attacks, "independent"]


def test_one_seed_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        run_verification(VerificationConfig(seeds=(0,)), str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_a_diverged_seed_is_flagged_and_the_other_is_unchanged(run, tmp_path, poison_init, capsys):
    _, clean, _ = run
    poison_init(1)
    summary, _ = run_verification(TINY, str(tmp_path), progress=False)
    rows = [summary["imp"]["ticket_final_accuracy"], summary["before"]["test_accuracy"]]
    rows += [summary["attacks"][a][k] for a in TINY.attacks for k in ("test_accuracy", "bit_error", "trigger_accuracy")]
    for row in rows:  # seed 1 is flagged; seed 0 is as in the clean run
        assert row["n"] == 1 and row["diverged"] == 1 and np.isnan(row["per_seed"][1])
    for k in ("bit_error", "trigger_accuracy"):  # seed 0's control reads seed 1's ticket and model: flagged
        row = summary["independent"][k]
        assert row["diverged"] == 1 and np.isnan(row["per_seed"][0])
        assert row["per_seed"][1] == clean["independent"][k]["per_seed"][1]
    for name in TINY.attacks:
        for k in ("test_accuracy", "bit_error", "trigger_accuracy"):
            assert summary["attacks"][name][k]["per_seed"][0] == clean["attacks"][name][k]["per_seed"][0], (name, k)
    table = verification_table(summary).splitlines()
    assert "(1 diverged)" in table[0] and all("(1 diverged)" in line for line in table[3:])
    assert "leave out diverged (non-finite) seeds" in capsys.readouterr().err
