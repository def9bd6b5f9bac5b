"""What every experiment shares: one base config, one builder, config checks.

Each experiment's config extends :class:`ExperimentConfig` (model, data, optimizer,
schedule, seeds, seed strategy, devices) with its own fields; :func:`build` turns any of
them into the dataset on the device, the model and a trainer whose optimizer ends with
:func:`lottojax.masked_updates`. Every field carries its help text (and choices) as
metadata, which the command line (:mod:`lottojax.experiments.cli`) shows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import numpy as np
import optax

from lottojax.optim import masked_updates
from lottojax.seeds import STRATEGIES

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")

#: ``config.widths`` reaches each model under this keyword.
WIDTH_ARGUMENT = {"mlp": "hidden", "lenet300100": "hidden", "cnn1d": "channels", "conv2": "conv_widths",
                  "conv4": "conv_widths", "conv6": "conv_widths", "vgg11": "widths", "vgg16": "widths"}


def option(default, help: str, *, choices=None, extends: bool = False):
    """A config field with its command-line help; ``choices`` are checked by :func:`check`;
    ``extends`` marks a field that only lengthens a run (more rounds): changing it keeps
    the run directory, so a finished run continues instead of starting over."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "extends": extends})


def override(config_cls, name: str, default):
    """Field ``name`` of ``config_cls`` with another default, keeping its help, choices and
    ``extends``: how an experiment (or a preset) changes the default of an inherited field.

    Examples:
      >>> @dataclasses.dataclass(frozen=True)
      ... class Short(ExperimentConfig):
      ...     num_steps: int = override(ExperimentConfig, 'num_steps', 500)
      >>> field = {f.name: f for f in dataclasses.fields(Short)}['num_steps']
      >>> Short().num_steps, field.metadata['help']
      (500, 'training steps per run (per IMP level)')
    """
    field = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    return dataclasses.field(default=default, metadata=field.metadata)


class ConfigError(ValueError):
    """A config field has a bad value; ``field`` names it (the CLI reports ``--field-name``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DataError(ValueError):
    """A dataset cannot be trained on as it is (non-finite inputs, bad labels, mismatched
    shapes); the message names the split and the first bad example."""


def check_dataset(data, *, num_classes: Optional[int] = None) -> None:
    """Raises :class:`DataError` before any work if ``data`` (a :class:`lottojax.data.Dataset`)
    has non-finite inputs, labels that are not integers in ``[0, num_classes)`` (default:
    ``data.num_classes``, what :func:`build` builds the model for), inputs and labels of different lengths, splits whose
    example shapes differ, or no training examples.

    Examples:
      >>> from lottojax.data import Dataset
      >>> x = np.zeros((4, 3), np.float32); y = np.array([0, 1, 1, 0])
      >>> check_dataset(Dataset(x, y, x, y, x, y))
      >>> check_dataset(Dataset(x, y, x, y, x, y - 1))
      Traceback (most recent call last):
      ...
      lottojax.experiments.base.DataError: y_test[0] = -1 is outside [0, 2): ...
    """
    splits = {name: np.asarray(getattr(data, name)) for name in data._fields}
    if splits["x_train"].shape[0] == 0:
        raise DataError("x_train has no examples: nothing to train on")
    classes = num_classes if num_classes is not None else data.num_classes
    for part in ("train", "val", "test"):
        x, y = splits[f"x_{part}"], splits[f"y_{part}"]
        if x.shape[0] != y.shape[0]:
            raise DataError(f"x_{part} has {x.shape[0]} examples but y_{part} has {y.shape[0]} labels")
        if x.shape[1:] != splits["x_train"].shape[1:] and x.shape[0]:
            raise DataError(f"x_{part} examples have shape {x.shape[1:]} but x_train's have "
                            f"{splits['x_train'].shape[1:]}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"y_{part} must be integer class indices of shape (N,), got {y.dtype} {y.shape}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            index = tuple(int(i) for i in np.unravel_index(int(np.argmin(np.isfinite(x))), x.shape))
            raise DataError(f"x_{part}{list(index)} = {x[index]}: inputs must be finite (NaN or inf in the data; "
                            "clean or re-download the dataset)")
        bad = (y < 0) | (y >= classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"y_{part}[{i}] = {int(y[i])} is outside [0, {classes}): labels must be class indices "
                            f"below the number of classes the model is built for ({classes})")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The fields every experiment has; the defaults are the MNIST-1D MLP with Adam."""

    model: str = option("mlp", "reference model (lottojax.models.create)")
    widths: tuple[int, ...] = option((), "hidden sizes (mlp, lenet300100), channels (cnn1d) or conv widths "
                                         "(conv2/4/6, vgg); empty: the model's own")
    dataset: str = option("mnist1d", "mnist1d, fashion-mnist, idx (with --data-dir) or tfds:<name>")
    data_dir: Optional[str] = option(None, "directory of the IDX files or of the prepared TFDS data")
    validation: Optional[int] = option(None, "validation examples held out of the training split "
                                             "(default: 500 for MNIST-1D, 5000 otherwise)")
    optimizer: str = option("adam", "optimizer (a masked_updates() transform is appended)", choices=OPTIMIZERS)
    learning_rate: float = option(1.2e-3, "learning rate")
    lr_drops: tuple[float, ...] = option((), "fractions of training at which the learning rate is multiplied by "
                                             "--lr-factor (e.g. 0.5 0.75)")
    lr_factor: float = option(0.1, "factor applied at each --lr-drops point")
    momentum: float = option(0.9, "momentum of 'momentum' (SGD with momentum)")
    weight_decay: float = option(0.0, "weight decay: decoupled for adamw, added to the gradient (L2) otherwise")
    batch_size: int = option(60, "training minibatch size")
    num_steps: int = option(3000, "training steps per run (per IMP level)")
    eval_every: int = option(100, "steps between evaluations on the validation and test sets")
    seeds: tuple[int, ...] = option((0, 1, 2, 3, 4), "seeds: a count N (seeds 0..N-1), a list (0,3,7) or a "
                                                     "range (10-14)")
    seed_strategy: str = option("auto", "how seeds run: auto (map on CPU, vmap on accelerators), vmap or map",
                                choices=STRATEGIES)
    devices: Optional[str] = option(None, "'all': split the seeds across every device (of every process)",
                                    choices=(None, "all"))

    def check(self) -> None:
        """Raises :class:`ConfigError` naming the first bad field; experiments extend it.

        Examples:
          >>> ExperimentConfig(seeds=()).check()
          Traceback (most recent call last):
          ...
          lottojax.experiments.base.ConfigError: seeds: give at least one seed
          >>> ExperimentConfig(optimizer='lion').check()
          Traceback (most recent call last):
          ...
          lottojax.experiments.base.ConfigError: optimizer: 'lion' is not one of ('adam', 'sgd', 'momentum', 'adamw')
        """
        check_fields(self)


def check_fields(config) -> None:
    """The checks of :meth:`ExperimentConfig.check`: choices from the field metadata, then
    the shared numeric ranges."""
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if choices is not None and item not in choices:
                raise ConfigError(field.name, f"{item!r} is not one of {choices}")
    if not config.seeds:
        raise ConfigError("seeds", "give at least one seed")
    if any(s < 0 for s in config.seeds) or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError("seeds", f"{config.seeds}: seeds must be distinct and >= 0")
    for name in ("batch_size", "num_steps", "eval_every"):
        if getattr(config, name) < 1:
            raise ConfigError(name, f"{getattr(config, name)} must be >= 1")
    if config.validation is not None and config.validation < 1:
        raise ConfigError("validation", f"{config.validation} must be >= 1 (early stopping needs a validation split)")
    if not config.learning_rate > 0:
        raise ConfigError("learning_rate", f"{config.learning_rate} must be > 0")
    if not all(0 < f < 1 for f in config.lr_drops):
        raise ConfigError("lr_drops", f"{config.lr_drops}: each must be a fraction in (0, 1)")
    if config.widths and config.model not in WIDTH_ARGUMENT:
        raise ConfigError("widths", f"applies to {sorted(WIDTH_ARGUMENT)}, not {config.model!r}")


def learning_rate_schedule(config, total_steps: int, *, steps_per_epoch: Optional[int] = None):
    """``learning_rate``, times ``lr_factor`` at each fraction ``lr_drops`` of ``total_steps``
    (rounded to whole epochs when ``steps_per_epoch`` is given); a constant without drops.

    Examples:
      >>> c = ExperimentConfig(learning_rate=1.0, lr_drops=(0.5, 0.75))
      >>> schedule = learning_rate_schedule(c, 80, steps_per_epoch=10)
      >>> [round(float(schedule(s)), 4) for s in (0, 39, 40, 59, 60)]
      [1.0, 1.0, 0.1, 0.1, 0.01]
      >>> learning_rate_schedule(ExperimentConfig(), 100)
      0.0012
    """
    if not config.lr_drops:
        return config.learning_rate
    boundaries: dict[int, float] = {}
    for fraction in config.lr_drops:
        if steps_per_epoch:
            step = int(round(fraction * total_steps / steps_per_epoch)) * steps_per_epoch
        else:
            step = int(round(fraction * total_steps))
        boundaries[step] = boundaries.get(step, 1.0) * config.lr_factor
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def make_optimizer(name: str, learning_rate, *, momentum: float = 0.9, weight_decay: float = 0.0,
                   masked: bool = True) -> optax.GradientTransformation:
    """An optax optimizer by name, ending with :func:`lottojax.masked_updates` (without it
    when ``masked=False``: the inner optimizer that a sparse-training transform wraps).

    ``weight_decay`` is decoupled for ``adamw`` and added to the gradient (L2) otherwise.
    ``learning_rate`` may be an optax schedule.

    Examples:
      >>> import jax.numpy as jnp, lottojax as lj
      >>> tx = make_optimizer('momentum', 0.1, weight_decay=1e-4)
      >>> lj.get_mask(tx.init({'w': jnp.ones((2, 2))}))['w'].all()
      Array(True, dtype=bool)
    """
    mask = [masked_updates()] if masked else []
    if name == "adamw":
        return optax.chain(optax.adamw(learning_rate, weight_decay=weight_decay), *mask)
    base = {
        "adam": lambda: optax.adam(learning_rate),
        "sgd": lambda: optax.sgd(learning_rate),
        "momentum": lambda: optax.sgd(learning_rate, momentum=momentum),
    }
    if name not in base:
        raise ValueError(f"optimizer={name!r} unknown; choose from {OPTIMIZERS}")
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*decay, base[name](), *mask)


def load_dataset(name: str, *, data_dir: Optional[str] = None, validation: Optional[int] = None):
    """:func:`lottojax.data.load` with the directory argument each source expects."""
    from lottojax import data as datasets

    kwargs: dict[str, Any] = {} if validation is None else {"validation": validation}
    if data_dir is not None:
        kwargs["data_dir" if name.startswith("tfds:") else "directory"] = data_dir
    return datasets.load(name, **kwargs)


def model_kwargs(config) -> dict[str, Any]:
    """The model constructor's keyword for ``config.widths`` (empty without widths)."""
    return {WIDTH_ARGUMENT[config.model]: tuple(config.widths)} if config.widths else {}


class Setup(NamedTuple):
    """What :func:`build` returns: the data (on the device), the model, the optimizer and
    a trainer for one config."""

    data: Any
    model: Any
    optimizer: optax.GradientTransformation
    trainer: Any
    steps_per_epoch: int


def build(config, *, total_steps: Optional[int] = None, eval_every: Optional[int] = None,
          per_epoch_schedule: bool = False, data=None) -> Setup:
    """Data, model, optimizer and trainer for any :class:`ExperimentConfig`.

    ``total_steps`` (default ``config.num_steps``) is the length the learning-rate drops
    refer to; ``eval_every`` overrides ``config.eval_every``; ``per_epoch_schedule`` puts
    the drops at whole epochs. Pass ``data`` to reuse a loaded dataset.
    """
    import jax

    from lottojax.models import create
    from lottojax.train import make_trainer

    if data is None:
        data = load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation)
        check_dataset(data)
        data = jax.device_put(data)
    else:
        check_dataset(data)
    steps_per_epoch = data.x_train.shape[0] // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError("batch_size", f"{config.batch_size} exceeds the {data.x_train.shape[0]} training examples")
    model = create(config.model, input_shape=data.input_shape, num_classes=data.num_classes, **model_kwargs(config))
    schedule = learning_rate_schedule(config, total_steps or config.num_steps,
                                      steps_per_epoch=steps_per_epoch if per_epoch_schedule else None)
    optimizer = make_optimizer(config.optimizer, schedule, momentum=config.momentum, weight_decay=config.weight_decay)
    trainer = make_trainer(model, optimizer, batch_size=config.batch_size, eval_every=eval_every or config.eval_every)
    return Setup(data, model, optimizer, trainer, steps_per_epoch)


def seed_slots(config) -> tuple[int, ...]:
    """``config.seeds`` padded to a multiple of ``config.devices``' count (the padding
    repeats the last seed; results of padded slots are dropped)."""
    from lottojax.seeds import device_count, pad_seeds

    return pad_seeds(config.seeds, device_count(config.devices))


def put_seed_slots(config, tree):
    """Per-seed host arrays (``len(config.seeds)`` first) on every seed slot, placed on
    ``config.devices``: the padding slots repeat the last seed (:func:`seed_slots`), and
    their results are dropped.

    Examples:
      >>> put_seed_slots(ExperimentConfig(seeds=(3, 4)), {'w': np.array([1., 2.])})['w'].tolist()
      [1.0, 2.0]
    """
    import jax

    from lottojax.seeds import put_seeded

    owner = np.minimum(np.arange(len(seed_slots(config))), len(config.seeds) - 1)
    return put_seeded(jax.tree.map(lambda x: np.asarray(x)[owner], tree), config.devices, stacked=True)


def stream_keys(config, *streams: str) -> tuple:
    """Per named key stream (:data:`lottojax.seeds.KEY_STREAMS`), the keys of every seed
    slot, placed on ``config.devices``.

    Examples:
      >>> init, data = stream_keys(ExperimentConfig(seeds=(3, 4)), 'init', 'data')
      >>> init.shape, data.shape
      ((2,), (2,))
    """
    from lottojax.seeds import put_seeded, seed_keys

    slots = seed_slots(config)
    return tuple(put_seeded(seed_keys(slots, s), config.devices, stacked=True) for s in streams)


def over_seeds(config, fn, in_axes):
    """``fn`` jitted over the seed axis as ``config`` says (``seed_strategy``, ``devices``)."""
    import jax

    from lottojax.seeds import map_seeds

    return jax.jit(map_seeds(fn, in_axes=in_axes, strategy=config.seed_strategy, devices=config.devices))
