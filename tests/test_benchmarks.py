"""The benchmark scripts run end to end at tiny sizes (a smoke test: no timing is asserted).

Speed is measured by running ``experiments/benchmarks/*.py``, never here; this only keeps
them from rotting and checks the figures that show both sides of a comparison did the
same work.
"""
import doctest
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lottojax import timing
from lottojax.sparse_inference import CONV_FORMATS, FORMATS

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
TINY = ["--dataset", "synthetic", "--synthetic-examples", "600", "--repeats", "1", "--warmup", "0",
        "--step-steps", "10", "--step-repeats", "1", "--seed-steps", "10", "--imp-steps", "10", "--seeds", "2", "--torch-threads", "1"]


@pytest.fixture
def foundation(monkeypatch):
    """The foundation benchmark script, imported as a module."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("foundation")


def test_docstring_examples_of_the_foundation_benchmark(foundation):
    result = doctest.testmod(foundation, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_interleaved_rejects_a_setup_without_its_callable():
    with pytest.raises(ValueError, match="setups"):
        timing.interleaved({"a": lambda: None}, repeats=1, setups={"b": lambda: ()})


@pytest.mark.parametrize("n", [6, 9, 25])
def test_median_interval_covers_the_true_median_at_least_95_percent_of_the_time(n):
    # skewed data (exponential, true median ln 2): the interval must not assume symmetry
    samples = np.random.default_rng(n).exponential(size=(4000, n))
    covered = [low <= np.log(2) <= high for low, high in map(timing.median_interval, samples)]
    assert 0.95 <= np.mean(covered) <= 0.995  # conservative, but not the whole range (k >= 1)


def test_torch_comparison_is_skipped_with_the_install_hint_when_torch_is_missing(foundation, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    torch, reason = foundation.import_torch(True)
    assert torch is None and 'pip install -e ".[torch]"' in reason


def test_foundation_runs_end_to_end_and_both_sides_do_the_same_work(foundation, tmp_path, capsys):
    record = foundation.main([*TINY, "--out", str(tmp_path)])

    assert json.loads((tmp_path / "benchmarks" / "foundation.json").read_text()) == json.loads(json.dumps(record))
    table = capsys.readouterr().out
    comparisons = {c["title"][0]: c for c in record["comparisons"]}
    torch_ran = record["machine"]["torch"] is not None
    assert sorted(comparisons) == ["1", "2", "3", "4"][: 4 if torch_ran else 3]
    for c in comparisons.values():
        assert c["ratio"]["value"] > 0 and c["ratio"]["name"] in table
        assert all(case["repeats"] == 1 for case in c["cases"].values())
    assert comparisons["1"]["ratio"]["target"] == "<= 1.02"
    assert comparisons["1"]["ratio"]["verdict"] in ("met", "NOT MET")  # one repeat: no interval, so never undecided
    # the Python loop trains on exactly the scanned epoch's batches; vmapped seeds equal single runs
    assert comparisons["2"]["checks"]["max |loss difference| over the epoch"] < 1e-5
    assert comparisons["3"]["checks"]["max |loss difference| vmapped vs per seed"] < 1e-5
    if not torch_ran:
        assert "PyTorch is not installed" in record["torch_comparison"] and "[torch]" in table
        return
    checks = comparisons["4"]["checks"]
    jax_density, torch_density = checks["kernel density after pruning (lottojax, PyTorch)"]
    assert jax_density == torch_density == pytest.approx(1 - (0.2 * (235200 + 30000) + 0.1 * 1000) / 266200, abs=1e-6)
    assert checks["fraction of new-mask entries where both agree"] > 0.99
    assert checks["|trained weight difference| (median, max)"][0] < 1e-5


def test_vmap_cpu_benchmark_runs_end_to_end(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    importlib.import_module("vmap_cpu").main(["--seeds", "2", "--repeats", "1"])
    printed = capsys.readouterr().out
    for row in ("x W", "g W^T", "x^T g", "gradients", "sgd", "adam"):
        assert row in printed


def test_xla_cpu_dots_benchmark_compiles_both_ways_and_trains_the_same(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    dots = importlib.import_module("xla_cpu_dots")
    monkeypatch.setattr(dots, "CASES", dots.CASES[:1])
    (comparison,) = dots.main(["--steps", "3", "--repeats", "1"])
    assert comparison.checks["first-step loss difference"] < 1e-5  # same step, products summed in another order


def test_sparse_training_overhead_benchmark_runs_every_method_at_the_same_density(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    importlib.import_module("sparse_training_overhead").main(
        ["--model", "mlp", "--steps", "4", "--every", "2", "--repeats", "1"])
    printed = capsys.readouterr().out
    for case in ("static", "gmp/2", "set/2", "rigl/2", "gmp/1", "set/1", "rigl/1", "ste"):
        assert f"{case} vs masked dense" in printed
    densities = [line.split(":")[1] for line in printed.splitlines() if "final density" in line]
    assert len(densities) == 8 and all(d.split(",")[0].strip() == "0.1" for d in densities)


def test_ticket_speed_benchmark_times_every_form_of_every_ticket(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    out = tmp_path / "ticket_speed.json"
    importlib.import_module("ticket_speed").main(
        ["--synthetic", "--image-size", "8", "--synthetic-examples", "200", "--eval-examples", "50", "--steps", "2",
         "--densities", "0.036", "--tickets", "magnitude", "--batches", "1,16", "--repeats", "1", "--auto-repeats", "1", "--latency-calls", "2",
         "--train-steps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    models, densities, batches = ("lenet300100", "conv2"), (0.036,), (1, 16)
    assert {(r["model"], r["target_density"], r["batch"]) for r in saved["inference"]} == {
        (m, d, b) for m in models for d in densities for b in batches}
    for row in saved["inference"]:
        assert set(row["median_s"]) == {"dense", "masked", "compacted", "sparse export"}
        assert max(row["max_logit_diff"].values()) < 1e-4  # every form computes the ticket
        assert row["pays"] in ("yes", "NO", "unclear") and row["fastest"] in row["median_s"]
        assert (row["target"] is not None) == (row["density"] <= 0.05)
        assert row["formats"]["output"] in FORMATS and row["formats"].get("conv0", "dense") in CONV_FORMATS
        assert row["calls_per_repeat"] == (2 if row["batch"] == 1 else 1)
    assert {(r["model"], r["target_density"]) for r in saved["training"]} == {(m, d) for m in models for d in densities}
    for ticket in saved["tickets"]:  # magnitude tickets at IMP's per-layer rates, near the target
        assert abs(ticket["density"] - ticket["target_density"]) < 0.25 * ticket["target_density"]
    printed = capsys.readouterr().out
    assert "Where tickets pay" in printed and "Training step: compacted vs masked dense" in printed
