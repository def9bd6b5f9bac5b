"""The Lottery Ticket Hypothesis experiment (Frankle & Carbin 2019) from one config.

:func:`run_lottery` is what ``python experiments/lottery.py`` runs; a notebook can call it
the same way. It loads the dataset, builds the model and optimizer, runs IMP with the
two controls for all seeds in one compiled program per level, and writes into
``<root>/lottery-<config hash>/``: ``config.json``, ``results.json`` (per level and arm:
mean, std and per-seed values), ``results.npz`` (every array, training curves included),
``lottery.png`` (accuracy and early-stop iteration vs density) and ``checkpoint/``
(resumes a killed run from its last finished level).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from lottojax.experiment import TrainingConfig, make_training, run_directory, write_json
from lottojax.imp import CONTROLS, IMPResult, run_imp
from lottojax.prune import rates_by_layer


@dataclasses.dataclass(frozen=True)
class LotteryConfig(TrainingConfig):
    """Everything that defines a run; the defaults are the MNIST-1D reproduction.

    The MLP 40-300-100-10 with Adam 1.2e-3, batch 60, 3000 steps per level, and per-round
    rates conv 10% / dense 20% / output 10% follow the paper's LeNet-300-100 setting
    scaled to MNIST-1D; 16 rounds reach 2.8% of the hidden-layer weights (3.2% overall).
    """

    rounds: int = 16
    conv_rate: float = 0.1
    dense_rate: float = 0.2
    output_rate: float = 0.1
    scope: str = "layerwise"  # 'global' prunes dense_rate of all prunable weights per round
    rewind_step: int = 0
    one_shot: bool = False
    controls: tuple[str, ...] = CONTROLS
    seeds: int = 5
    seed_strategy: str = "auto"  # 'auto', 'vmap' or 'map': see lottojax.seeds.map_seeds
    devices: Optional[str] = None  # 'all': split the seeds across every device (of every process)


def run_lottery(config: LotteryConfig, root: str = "runs", *, progress: bool = True) -> tuple[IMPResult, str]:
    """Runs (or resumes) the experiment; returns the result and the run directory."""
    from lottojax.report import imp_summary, plot_imp

    workdir = run_directory(root, "lottery", config)
    data, _, trainer = make_training(config)
    if config.scope == "global":
        fraction = config.dense_rate
    else:
        fraction = rates_by_layer(conv=config.conv_rate, dense=config.dense_rate, output=config.output_rate)
    result = run_imp(
        trainer, data, seeds=range(config.seeds), rounds=config.rounds, fraction=fraction,
        num_steps=config.num_steps, scope=config.scope, rewind_step=config.rewind_step,
        one_shot=config.one_shot, controls=config.controls,
        seed_strategy=config.seed_strategy, devices=config.devices,
        checkpoint_dir=os.path.join(workdir, "checkpoint"), progress=progress,
    )
    write_json(os.path.join(workdir, "results.json"), {"config": dataclasses.asdict(config), "levels": imp_summary(result)})
    arrays = {k: v for k, v in result._asdict().items() if isinstance(v, np.ndarray)}
    arrays.update({f"history_{k}": v for k, v in result.history._asdict().items()})
    np.savez(os.path.join(workdir, "results.npz"), arms=np.array(result.arms), seeds=np.array(result.seeds), **arrays)
    plot_imp(result, os.path.join(workdir, "lottery.png"),
             title=f"IMP on {config.dataset} ({config.model}), {config.seeds} seeds, rewind to step {config.rewind_step}")
    return result, workdir
