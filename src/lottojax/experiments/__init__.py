"""The experiment layer: every experiment as ``Config`` + ``run(config, root) -> (result, workdir)``.

The pure core (:mod:`lottojax`) never imports this package. Here live what the
experiments share — one base config and builder (:mod:`~lottojax.experiments.base`), run
directories, the results writer and statistics (:mod:`~lottojax.experiments.store`),
plotting (:mod:`~lottojax.experiments.plots`) and the command line
(:mod:`~lottojax.experiments.cli`) — and the experiments themselves.
"""
from lottojax.experiments.base import ConfigError, ExperimentConfig, Setup, build, make_optimizer
from lottojax.experiments.early_bird import EarlyBirdConfig, eb_table, run_early_bird
from lottojax.experiments.grokking import GrokkingConfig, grokking_table, run_grokking
from lottojax.experiments.jackpots import JackpotConfig, jackpot_table, run_jackpots
from lottojax.experiments.lottery import LotteryConfig, imp_table, load_lottery, run_lottery
from lottojax.experiments.stability import (
    CNN1DStabilityConfig,
    StabilityConfig,
    StabilityResult,
    run_stability,
    stability_table,
)
from lottojax.experiments.sparse_training import SparseTrainingConfig, run_sparse_training, sparse_training_table
from lottojax.experiments.store import mean_std, stats

__all__ = [
    "CNN1DStabilityConfig",
    "ConfigError",
    "EarlyBirdConfig",
    "ExperimentConfig",
    "GrokkingConfig",
    "JackpotConfig",
    "LotteryConfig",
    "Setup",
    "SparseTrainingConfig",
    "StabilityConfig",
    "StabilityResult",
    "build",
    "eb_table",
    "grokking_table",
    "imp_table",
    "jackpot_table",
    "load_lottery",
    "make_optimizer",
    "mean_std",
    "run_early_bird",
    "run_grokking",
    "run_jackpots",
    "run_lottery",
    "run_sparse_training",
    "run_stability",
    "sparse_training_table",
    "stability_table",
    "stats",
]
