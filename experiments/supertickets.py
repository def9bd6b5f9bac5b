"""SuperTickets (You et al., ECCV 2022): joint channel search and gradual pruning in one run,
with and without mask reactivation, against the slim -> shrink -> train -> prune -> retrain
pipeline at the same final density.

    python experiments/supertickets.py                        # CNN1D 64-64-64 + BN on MNIST-1D, 3 seeds, 42 epochs
    python experiments/supertickets.py --arms joint pipeline --seeds 5
    python experiments/supertickets.py --penalty 1.0 --target-sparsity 0.8

Prints a table (test accuracy mean ± std over seeds, final kernel density, final widths per
seed, final forward MFLOPs per example, total training GFLOPs and their multiple of dense
training) and writes results, per-epoch curves and a plot (accuracy vs training FLOPs;
channels and density over the epochs) to the run directory. Re-running the same command
resumes: every finished arm and seed is kept.
"""
from lottojax.experiments import cli
from lottojax.experiments.supertickets import SuperTicketsConfig, run_supertickets, supertickets_table


def main(argv=None) -> None:
    cli.main(run_supertickets, SuperTicketsConfig, argv, description=__doc__, experiment="supertickets",
             report=lambda summary: print(supertickets_table(summary)))


if __name__ == "__main__":
    main()
