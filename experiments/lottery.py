"""IMP with the LTH controls: tickets vs random reinit vs random pruning, many seeds at once.

    python experiments/lottery.py                       # MNIST-1D MLP, 5 seeds, 16 rounds
    python experiments/lottery.py --model lenet300100 --dataset fashion-mnist --num-steps 5000
    python experiments/lottery.py --dataset tfds:cifar10 --model conv2 --learning-rate 2e-4
    python experiments/lottery.py --rewind-step 200 --scope global --seeds 10-14

Prints a table (density; per arm the test accuracy at the early-stop iteration and that
iteration, mean ± std over seeds) and writes results, tickets and a plot to the run
directory. Re-running the same command resumes a killed run from its last finished level;
the same command with more --rounds continues a finished run.
"""
from lottojax.experiments import cli
from lottojax.experiments.lottery import LotteryConfig, imp_table, run_lottery


def main(argv=None) -> None:
    cli.main(run_lottery, LotteryConfig, argv, description=__doc__, experiment="lottery", report=lambda r: print(imp_table(r)))


if __name__ == "__main__":
    main()
