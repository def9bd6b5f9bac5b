"""Lottery Jackpots (Zhang et al.): masks searched on a frozen pre-trained network, against
the magnitude mask, a random start and a random (untrained) network.

    python experiments/jackpots.py                                   # MNIST-1D MLP, 5 seeds, 90% and 95%
    python experiments/jackpots.py --dataset fashion-mnist --model lenet300100
    python experiments/jackpots.py --sparsities 0.9 --arms magnitude search random-init --seeds 3

Pre-trains the dense network (--optimizer, --learning-rate, --batch-size, --num-steps: Adam
1.2e-3, batch 60, 3000 steps by default) and keeps it in the run directory; then, per
sparsity and arm, searches the scores (--search-* flags: SGD 0.1 cosine, momentum 0.9, weight
decay 5e-4, batch 256, 1500 steps) with one short restriction after every step. Prints a
table (test accuracy and training loss after the search, mean ± std over seeds; the start's
accuracy; the fraction of the start mask still kept; the steps to random-init's final
training loss) and writes results, the table and a plot of accuracy and training loss vs
search step to the run directory. Re-running the same command resumes.
"""
from lottojax.experiments import cli
from lottojax.experiments.jackpots import JackpotConfig, jackpot_table, run_jackpots


def main(argv=None) -> None:
    cli.main(run_jackpots, JackpotConfig, argv, description=__doc__, experiment="jackpots",
             report=lambda summary: print(jackpot_table(summary)))


if __name__ == "__main__":
    main()
