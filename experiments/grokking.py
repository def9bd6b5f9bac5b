"""Grokking tickets (Minegishi et al.): the ticket of a grokked MLP vs dense training and controls.

    python experiments/grokking.py                            # (a + b) mod 67, MLP, 5 seeds, 40K steps
    python experiments/grokking.py --arms ticket random --seeds 3 --num-steps 20000
    python experiments/grokking.py --model grok-transformer --ordered --op -

Trains the dense network to grokking (full batch, AdamW with weight decay 1), takes the
global magnitude mask of the grokked weights keeping 40% (the grokking ticket), rewinds it
to θ0 and trains it against the controls: a random mask, SNIP/GraSP/SynFlow masks at
initialisation, dense θ0 scaled to the ticket's norm (global L2 and the reference code's
per-matrix ratio), masks from the memorisation and transition checkpoints, and the ticket
without weight decay. Prints a table (per arm: steps to 95% test accuracy, mean ± std over
the seeds that got there, how many did, the multiple of dense's steps, final test accuracy)
and writes results and a plot of accuracy vs step to the run directory. Re-running the same
command resumes at the first arm not yet trained.
"""
from lottojax.experiments import cli
from lottojax.experiments.grokking import GrokkingConfig, grokking_table, run_grokking


def main(argv=None) -> None:
    cli.main(run_grokking, GrokkingConfig, argv, description=__doc__, experiment="grokking",
             report=lambda summary: print(grokking_table(summary)))


if __name__ == "__main__":
    main()
