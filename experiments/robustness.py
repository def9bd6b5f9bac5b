"""The robustness lottery (Li et al.): dense, IMP, one-shot magnitude, Early-Bird, random,
SNIP and SynFlow tickets at the same density under common corruptions, with the last-layer
geometry.

    python experiments/robustness.py                          # MNIST-1D MLP, 5 seeds, IMP's 10.7% density
    python experiments/robustness.py --seeds 3 --rounds 8 --arms dense imp random
    python experiments/robustness.py --dataset fashion-mnist --model lenet300100

Runs global IMP (--rounds rounds of --imp-rate); every ticket keeps exactly as many weights
as IMP's last level and trains --num-steps steps from the seed's θ0. Each trained network is
evaluated on the clean test split and on every corruption for the input type (images:
Gaussian noise, blur, contrast, brightness, quantisation; MNIST-1D: noise, shift, scale,
blur, drift, dropout) at severities 1-5. Prints the accuracy drop per arm and corruption and
the rank correlation between the rise in angle to the true class and the accuracy drop;
writes results and a plot to the run directory. Re-running the same command resumes.
"""
from lottojax.experiments import cli
from lottojax.experiments.robustness import RobustnessConfig, robustness_table, run_robustness


def main(argv=None) -> None:
    cli.main(run_robustness, RobustnessConfig, argv, description=__doc__, experiment="robustness",
             report=lambda summary: print(robustness_table(summary)))


if __name__ == "__main__":
    main()
