"""The experiment layer: every experiment as ``Config`` + ``run(config, root) -> (result, workdir)``.

The pure core (:mod:`lottojax`) never imports this package. Here live what the
experiments share — one base config and builder (:mod:`~lottojax.experiments.base`), run
directories, the results writer and statistics (:mod:`~lottojax.experiments.store`),
plotting (:mod:`~lottojax.experiments.plots`) and the command line
(:mod:`~lottojax.experiments.cli`) — and the experiments themselves.
"""
from lottojax.experiments.base import ConfigError, DataError, ExperimentConfig, Setup, build, check_dataset, make_optimizer
from lottojax.experiments.early_bird import EarlyBirdConfig, eb_table, run_early_bird
from lottojax.experiments.federated import FederatedConfig, federated_table, run_federated
from lottojax.experiments.grokking import GrokkingConfig, grokking_table, run_grokking
from lottojax.experiments.jackpots import JackpotConfig, jackpot_table, run_jackpots
from lottojax.experiments.layer_tickets import LayerTicketConfig, layer_ticket_table, run_layer_tickets
from lottojax.experiments.lottery import LotteryConfig, imp_table, load_lottery, run_lottery
from lottojax.experiments.metrics import log_history, read_metrics
from lottojax.experiments.reprogram import ReprogramConfig, reprogram_table, run_reprogram
from lottojax.experiments.robustness import RobustnessConfig, robustness_table, run_robustness
from lottojax.experiments.stability import (
    CNN1DStabilityConfig,
    StabilityConfig,
    StabilityResult,
    run_stability,
    stability_table,
)
from lottojax.experiments.sparse_training import SparseTrainingConfig, run_sparse_training, sparse_training_table
from lottojax.experiments.store import (
    RunLockedError, diverged_runs, exclusive, load_or_run, mean_std, read_results, stats)
from lottojax.experiments.supertickets import SuperTicketsConfig, run_supertickets, supertickets_table
from lottojax.experiments.verification import VerificationConfig, run_verification, verification_table

__all__ = [
    "CNN1DStabilityConfig",
    "ConfigError",
    "DataError",
    "EarlyBirdConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "GrokkingConfig",
    "JackpotConfig",
    "LayerTicketConfig",
    "LotteryConfig",
    "ReprogramConfig",
    "RobustnessConfig",
    "RunLockedError",
    "Setup",
    "SparseTrainingConfig",
    "StabilityConfig",
    "StabilityResult",
    "SuperTicketsConfig",
    "VerificationConfig",
    "build",
    "check_dataset",
    "diverged_runs",
    "eb_table",
    "exclusive",
    "federated_table",
    "grokking_table",
    "imp_table",
    "jackpot_table",
    "layer_ticket_table",
    "load_lottery",
    "load_or_run",
    "log_history",
    "make_optimizer",
    "mean_std",
    "read_metrics",
    "read_results",
    "reprogram_table",
    "robustness_table",
    "run_early_bird",
    "run_federated",
    "run_grokking",
    "run_jackpots",
    "run_layer_tickets",
    "run_lottery",
    "run_reprogram",
    "run_robustness",
    "run_sparse_training",
    "run_stability",
    "run_supertickets",
    "run_verification",
    "sparse_training_table",
    "stability_table",
    "stats",
    "supertickets_table",
    "verification_table",
]
