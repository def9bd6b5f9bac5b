"""What every experiment script shares: optimizers and datasets by name, run directories.

A run directory is ``<root>/<experiment>-<hash of the config>``: the same config always
lands in the same directory (so a killed run resumes there), a changed one never does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

import optax

from lottojax.optim import masked_updates

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")


def make_optimizer(
    name: str, learning_rate, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """An optax optimizer by name, ending with :func:`lottojax.masked_updates`.

    ``weight_decay`` is decoupled for ``adamw`` and added to the gradient (L2) otherwise.
    ``learning_rate`` may be an optax schedule.

    Examples:
      >>> import jax.numpy as jnp, lottojax as lj
      >>> tx = make_optimizer('momentum', 0.1, weight_decay=1e-4)
      >>> lj.get_mask(tx.init({'w': jnp.ones((2, 2))}))['w'].all()
      Array(True, dtype=bool)
    """
    if name == "adamw":
        return optax.chain(optax.adamw(learning_rate, weight_decay=weight_decay), masked_updates())
    base = {
        "adam": lambda: optax.adam(learning_rate),
        "sgd": lambda: optax.sgd(learning_rate),
        "momentum": lambda: optax.sgd(learning_rate, momentum=momentum),
    }
    if name not in base:
        raise ValueError(f"optimizer={name!r} unknown; choose from {OPTIMIZERS}")
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*decay, base[name](), masked_updates())


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The training settings the IMP experiments share; the defaults are the MNIST-1D
    reproduction (the MLP 40-300-100-10, Adam 1.2e-3, batch 60, 3000 steps)."""

    model: str = "mlp"
    dataset: str = "mnist1d"
    data_dir: Optional[str] = None
    validation: Optional[int] = None  # None: the loader's default (500 for MNIST-1D, 5000 otherwise)
    optimizer: str = "adam"
    learning_rate: float = 1.2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 60
    num_steps: int = 3000
    eval_every: int = 100


def make_training(config: TrainingConfig):
    """``(data, model, trainer)`` for a :class:`TrainingConfig`: the dataset on the device,
    the model sized to it, and a trainer with the config's optimizer (ending with
    :func:`lottojax.masked_updates`)."""
    import jax

    from lottojax.models import create
    from lottojax.train import make_trainer

    data = jax.device_put(load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation))
    model = create(config.model, input_shape=data.input_shape, num_classes=data.num_classes)
    optimizer = make_optimizer(config.optimizer, config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return data, model, make_trainer(model, optimizer, batch_size=config.batch_size, eval_every=config.eval_every)


def load_dataset(name: str, *, data_dir: Optional[str] = None, validation: Optional[int] = None):
    """:func:`lottojax.data.load` with the directory argument each source expects."""
    from lottojax import data as datasets

    kwargs: dict[str, Any] = {} if validation is None else {"validation": validation}
    if data_dir is not None:
        kwargs["data_dir" if name.startswith("tfds:") else "directory"] = data_dir
    return datasets.load(name, **kwargs)


def config_hash(config) -> str:
    """A short stable hash of a dataclass config (its JSON with sorted keys)."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_directory(root: str, experiment: str, config) -> str:
    """Creates (or finds) ``root/experiment-<hash>`` and writes ``config.json`` into it.

    Examples:
      >>> import tempfile
      >>> @dataclasses.dataclass(frozen=True)
      ... class C:
      ...   lr: float = 0.1
      >>> root = tempfile.mkdtemp()
      >>> run_directory(root, 'lottery', C()) == run_directory(root, 'lottery', C())
      True
      >>> run_directory(root, 'lottery', C()) == run_directory(root, 'lottery', C(lr=0.2))
      False
    """
    path = os.path.join(root, f"{experiment}-{config_hash(config)}")
    os.makedirs(path, exist_ok=True)
    write_json(os.path.join(path, "config.json"), dataclasses.asdict(config))
    return path


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def parse_config(config_cls, argv=None, *, description: str = ""):
    """Parses ``--field-name value`` flags for every field of a dataclass config.

    Returns ``(config, out)`` where ``out`` is the ``--out`` root of the run directories.
    Optional fields take their inner type; bools get ``--flag/--no-flag``; tuples take
    several values. ``--cpu-devices N`` splits the host CPU into ``N`` JAX devices before
    JAX starts (with ``--devices all``, the seeds then run side by side on a multi-core CPU).

    Examples:
      >>> @dataclasses.dataclass(frozen=True)
      ... class C:
      ...   lr: float = 0.1
      ...   data_dir: Optional[str] = None
      ...   arms: tuple[str, ...] = ('a', 'b')
      ...   fast: bool = False
      >>> parse_config(C, ['--lr', '0.5', '--arms', 'b', '--fast'])
      (C(lr=0.5, data_dir=None, arms=('b',), fast=True), 'runs')
    """
    import argparse
    import typing

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="*", type=inner[0], default=field.default,
                                help=f"default: {' '.join(map(str, field.default))}")
        else:
            base = inner[0] if typing.get_origin(kind) is typing.Union else kind
            parser.add_argument(flag, type=base, default=field.default, help=f"default: {field.default}")
    parser.add_argument("--out", default="runs", help="root of the run directories (default: runs)")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="split the CPU into this many JAX devices (with --devices all: seeds in parallel)")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    cpu_devices = args.pop("cpu_devices")
    if cpu_devices > 0:
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)  # must precede JAX's first computation
    for field in dataclasses.fields(config_cls):
        if typing.get_origin(hints[field.name]) is tuple:
            args[field.name] = tuple(args[field.name])
    return config_cls(**args), out
