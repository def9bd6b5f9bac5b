"""HideNseek (Vallapuram et al.): federated sign supermasks on a SynFlow-pruned θ0, against a
binary {0,1} supermask at the same density and dense FedAvg.

    python experiments/federated.py                                  # MNIST-1D MLP, 10 clients, 50 rounds, 3 seeds
    python experiments/federated.py --split dirichlet --alpha 0.1
    python experiments/federated.py --dataset fashion-mnist --model lenet300100 --arms sign-mean sign-vote

The server prunes θ0 once with SynFlow (--density, --synflow-rounds); the training split is
dealt to --num-clients non-IID clients (--split classes with --classes-per-client, or
dirichlet with --alpha); every round all clients train --local-epochs epochs (--optimizer,
--batch-size; --score-learning-rate for the supermask arms, --learning-rate for dense
FedAvg) and the server aggregates (--arms: sign-mean, sign-vote, binary, dense). Prints a
table (test accuracy after the last round and at rounds 10 and 25, mean ± std over seeds;
uplink per round) and writes results, the table and a plot of test accuracy vs round and vs
cumulative uplink to the run directory. Re-running the same command resumes.
"""
from lottojax.experiments import cli
from lottojax.experiments.federated import FederatedConfig, federated_table, run_federated


def main(argv=None) -> None:
    cli.main(run_federated, FederatedConfig, argv, description=__doc__, experiment="federated",
             report=lambda summary: print(federated_table(summary)))


if __name__ == "__main__":
    main()
