"""Lottery verification (Chen et al., NeurIPS 2021): an ownership signature in a ticket's
topology (white box) and a trigger set (black box), against fine-tuning and pruning attacks.

    python experiments/verification.py                                # MNIST-1D CNN1D (48 channels), 3 seeds
    python experiments/verification.py --signature bits               # a random bit matrix: no extra needed
    python experiments/verification.py --rebalance window --embed-cells data   # the reference code's rules

Finds a ticket by IMP (--rounds of --prune-rate global magnitude pruning, rewinding to
--rewind-step), writes a QR code of --signature-text (version 3, error correction H; needs
``pip install 'lottojax[verification]'``) into the connectivity map of the layer and window
that already agree with it most, retrains, trains a trigger-set model, and attacks both
(fine-tuning; 10/20/30% extra magnitude and random pruning). Prints a table (test accuracy,
bit error of the extracted window, whether OpenCV decodes it, trigger accuracy; the
independent ticket as the control) and writes results, the table and a figure of the
extracted windows to the run directory. Re-running the same command resumes.
"""
from lottojax.experiments import cli
from lottojax.experiments.verification import VerificationConfig, run_verification, verification_table


def main(argv=None) -> None:
    cli.main(run_verification, VerificationConfig, argv, description=__doc__, experiment="verification",
             report=lambda summary: print(verification_table(summary)))


if __name__ == "__main__":
    main()
