"""Early-Bird tickets: detect, draw, shrink and retrain, against dense training, many seeds at once.

    python experiments/early_bird.py                          # MNIST-1D 1D-CNN, 5 seeds, 30 epochs
    python experiments/early_bird.py --penalty 0.01           # slimming budget of the paper's 160 epochs
    python experiments/early_bird.py --search-bits 8          # 8-bit search, full-precision retraining
    python experiments/early_bird.py --mask weight            # unstructured (per-weight magnitude) EB
    python experiments/early_bird.py --dataset tfds:cifar10 --model vgg16 --epochs 160 --batch-size 64

Prints a table (per pruning ratio: the Early-Bird epoch of each seed; per retraining mode the
test accuracy, mean ± std over seeds, and the training FLOPs and wall time saved against
dense training) and writes results and the epoch x epoch mask-distance heatmap to the run
directory. Re-running the same command resumes a killed run.
"""
from lottojax.experiments import cli
from lottojax.experiments.early_bird import EarlyBirdConfig, eb_table, run_early_bird


def main(argv=None) -> None:
    cli.main(run_early_bird, EarlyBirdConfig, argv, description=__doc__, experiment="early_bird",
             report=lambda summary: print(eb_table(summary)))


if __name__ == "__main__":
    main()
