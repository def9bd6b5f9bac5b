"""Instability to SGD noise and IMP with late rewinding, swept over the rewind step k.

    python experiments/stability.py                    # both nets on MNIST-1D, 5 seeds
    python experiments/stability.py --net cnn1d        # only the CNN1D (BatchNorm, SGD+momentum)
    python experiments/stability.py --net mlp --seeds 8 --rewind-steps 0 10 100 --num-steps 2000

--net picks the setting (mlp: MLP 40-300-100-10 with Adam; cnn1d: CNN1D with BatchNorm and
SGD with momentum; both: the two in turn); every other flag overrides a field of that
setting. For each k: the error barrier between two copies trained from θ_k with different
data orders (dense network and IMP subnetwork), and IMP at ~5% density rewound to θ_k
against random reinitialisation and random pruning. Prints a table per net (mean ± std
over seeds) and writes results and a plot to the run directory. Re-running the same
command resumes a killed run at the last finished k.
"""
import argparse
import sys

from lottojax.experiment import parse_config
from lottojax.stability_experiment import PRESETS, run_stability, stability_table


def main(argv=None) -> None:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--net", choices=[*PRESETS, "both"], default="both")
    known, rest = pick.parse_known_args(sys.argv[1:] if argv is None else argv)
    for net in PRESETS if known.net == "both" else [known.net]:
        config, out = parse_config(PRESETS[net], rest, description=__doc__)
        result, workdir = run_stability(config, out)
        print(f"\n{net}: {config.model} on {config.dataset}, seeds {result.seeds.tolist()}, {result.seconds.sum():.0f} s")
        print(stability_table(result))
        print(f"results, plot and checkpoint in {workdir}/\n")


if __name__ == "__main__":
    main()
