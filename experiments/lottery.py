"""IMP with the LTH controls: tickets vs random reinit vs random pruning, many seeds at once.

    python experiments/lottery.py                       # MNIST-1D MLP, 5 seeds, 16 rounds
    python experiments/lottery.py --model lenet300100 --dataset fashion-mnist --num-steps 5000
    python experiments/lottery.py --dataset tfds:cifar10 --model conv2 --learning-rate 2e-4
    python experiments/lottery.py --rewind-step 200 --scope global

Prints a table (density; per arm the test accuracy at the early-stop iteration and that
iteration, mean ± std over seeds) and writes results and a plot to the run directory.
Re-running the same command resumes a killed run from its last finished level.
"""
from lottojax.experiment import parse_config
from lottojax.lottery import LotteryConfig, run_lottery
from lottojax.report import imp_table


def main(argv=None) -> None:
    config, out = parse_config(LotteryConfig, argv, description=__doc__)
    result, workdir = run_lottery(config, out)
    print(imp_table(result))
    print(f"\nresults, plot and checkpoint in {workdir}/")


if __name__ == "__main__":
    main()
