"""Instability to SGD noise and IMP with late rewinding, swept over the rewind step k.

    python experiments/stability.py                    # both nets on MNIST-1D, 5 seeds
    python experiments/stability.py --net cnn1d        # only the CNN1D (BatchNorm, SGD+momentum)
    python experiments/stability.py --net mlp --seeds 8 --rewind-steps 0 10 100 --num-steps 2000

--net picks the setting (mlp: MLP 40-300-100-10 with Adam; cnn1d: CNN1D with BatchNorm and
SGD with momentum; both: the two in turn); every other flag overrides a field of that
setting (the defaults shown are the mlp setting's). For each k: the error barrier between
two copies trained from θ_k with different data orders (dense network and IMP
subnetwork), and IMP at ~5% density rewound to θ_k against random reinitialisation and
random pruning. Prints a table per net (mean ± std over seeds) and writes results and a
plot to the run directory. Re-running the same command resumes a killed run at the last
finished k.
"""
import argparse
import sys

from lottojax.experiments import cli
from lottojax.experiments.stability import PRESETS, StabilityResult, run_stability, stability_table


def report(net: str):
    def show(result: StabilityResult) -> None:
        print(f"\n{net}: seeds {result.seeds.tolist()}, {result.seconds.sum():.0f} s")
        print(stability_table(result))

    return show


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    nets = argparse.ArgumentParser(add_help=False)
    nets.add_argument("--net", choices=[*PRESETS, "both"], default="both",
                      help="the setting: mlp, cnn1d, or both in turn (default: both)")
    net = nets.parse_known_args(argv)[0].net
    for name in PRESETS if net == "both" else [net]:
        cli.main(run_stability, PRESETS[name], argv, description=__doc__, experiment="stability",
                 report=report(name), parents=[nets])


if __name__ == "__main__":
    main()
