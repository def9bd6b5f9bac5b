"""Pruning at initialisation (random, magnitude, SNIP, GraSP, SynFlow) vs IMP tickets.

    python experiments/prune_at_init.py                          # MNIST-1D MLP, 5 seeds
    python experiments/prune_at_init.py --dataset fashion-mnist --model lenet300100
    python experiments/prune_at_init.py --levels 5 10 20 --methods snip synflow --seeds 8

Every method prunes the same initial weights of each seed to exactly the density of that
seed's IMP ticket (global IMP, 20% per round) at the given IMP levels, then trains with the
same data order. Prints a table (density; per method the test accuracy at the early-stop
iteration, mean ± std over seeds; "!k" marks k seeds whose mask disconnects the network)
and writes results and a plot to the run directory. Re-running the same command resumes.
"""
from lottojax.experiments import cli
from lottojax.experiments.prune_at_init import PruneAtInitConfig, prune_at_init_table, run_prune_at_init


def report(summary: dict) -> None:
    print(prune_at_init_table(summary))
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))


def main(argv=None) -> None:
    cli.main(run_prune_at_init, PruneAtInitConfig, argv, description=__doc__, experiment="prune_at_init",
             report=report)


if __name__ == "__main__":
    main()
