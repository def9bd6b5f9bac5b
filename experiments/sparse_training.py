"""Sparse training (GMP, static, SET, RigL, STE) vs IMP with weight rewinding, learning-rate
rewinding and fine-tuning, at equal final density.

    python experiments/sparse_training.py                       # MNIST-1D MLP, 5 seeds, 10% and 2%
    python experiments/sparse_training.py --dataset fashion-mnist --model lenet300100 --num-steps 10000
    python experiments/sparse_training.py --methods dense rigl set --densities 0.05 --seeds 10

Every method trains each run for the same --num-steps (IMP: per level). Prints a table
(per method and density: final test accuracy, mean ± std over seeds, the density reached
and the training FLOPs as a multiple of dense training) and writes results and a plot to
the run directory. Re-running the same command resumes.
"""
from lottojax.experiments import cli
from lottojax.experiments.sparse_training import SparseTrainingConfig, run_sparse_training, sparse_training_table


def main(argv=None) -> None:
    cli.main(run_sparse_training, SparseTrainingConfig, argv, description=__doc__, experiment="sparse_training",
             report=lambda summary: print(sparse_training_table(summary)))


if __name__ == "__main__":
    main()
