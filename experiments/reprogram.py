"""Reprogramming lottery tickets (Misra et al.): IMP tickets of a source task, frozen in
evaluation mode, reused for a target task by linear probing (a new head) and visual
prompting (a learned perturbation around the padded target input), full data and few-shot.

    python experiments/reprogram.py                     # MLP tickets, 100-3.5% of weights -> reversed MNIST-1D
    python experiments/reprogram.py --seeds 3 --shots 0 10 50
    python experiments/reprogram.py --model cnn1d --methods vp --target-length 24

Prints a table (per density: the source ticket's own test accuracy, then per method and
shots the target test accuracy and expected calibration error, mean ± std over seeds) and
writes results, per-evaluation curves and a plot (accuracy and ECE vs weights remaining)
to the run directory. Re-running the same command resumes: IMP's levels, every trained
source ticket and every finished reprogramming run are kept.
"""
from lottojax.experiments import cli
from lottojax.experiments.reprogram import ReprogramConfig, reprogram_table, run_reprogram


def main(argv=None) -> None:
    cli.main(run_reprogram, ReprogramConfig, argv, description=__doc__, experiment="reprogram",
             report=lambda summary: print(reprogram_table(summary)))


if __name__ == "__main__":
    main()
