"""The command line of every experiment script: flags from a config's fields.

Every field becomes ``--field-name`` with the help text and choices of its metadata;
``--seeds`` takes a count, a list or a range; bad values are argparse errors (exit 2)
that name the flag, raised before any directory is created. :func:`main` runs the
experiment, says when it resumes, and on Ctrl-C says how to resume. A run directory in use
by another run is refused (exit status 75) unless ``--wait`` asks to wait for it; a damaged
file, an unwritable or full output directory or bad data end the run with a one-line
message naming the file (exit status 1). See ``docs/reliability.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import typing
from typing import Callable, Optional, Sequence

from lottojax.experiments.base import ConfigError


def parse_seeds(text: str) -> tuple[int, ...]:
    """``'5'`` → seeds 0-4; ``'0,3,7'`` → those; ``'10-14'`` → 10 to 14 inclusive.

    Examples:
      >>> parse_seeds('3'), parse_seeds('0,3,7'), parse_seeds('10-12'), parse_seeds('1-2,5')
      ((0, 1, 2), (0, 3, 7), (10, 11, 12), (1, 2, 5))
      >>> parse_seeds('0')
      Traceback (most recent call last):
      ...
      argparse.ArgumentTypeError: '0': a count must be >= 1 (or give a list such as 0,3,7)
    """
    text = text.strip()
    try:
        if text.isdigit():
            if int(text) < 1:
                raise argparse.ArgumentTypeError(f"{text!r}: a count must be >= 1 (or give a list such as 0,3,7)")
            return tuple(range(int(text)))
        seeds: list[int] = []
        for part in text.split(","):
            low, _, high = part.partition("-")
            low_i, high_i = int(low), int(high or low)
            if low_i < 0 or high_i < low_i:
                raise ValueError
            seeds.extend(range(low_i, high_i + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count (5), a list (0,3,7) or a range (10-14)") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is repeated")
    return tuple(seeds)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def build_parser(config_cls, *, description: str = "", presets: Optional[dict] = None,
                 parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The argument parser of ``config_cls`` (see the module docstring); the flags of
    ``parents`` (parsers made with ``add_help=False``) come first, shown in ``--help``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=list(parents))
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=next(iter(presets)),
                            help="a named setting: its defaults, overridden by the other flags "
                                 f"(default: {next(iter(presets))})")
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = field.metadata.get("help", "")
        choices = [c for c in field.metadata.get("choices") or () if c is not None] or None
        default = field.default
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if field.name == "seeds" and typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=parse_seeds, default=None,
                                help=f"{help_text} (default: {len(default)})")
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
        elif typing.get_origin(kind) is tuple:
            shown = " ".join(map(str, default)) or "none"
            parser.add_argument(flag, nargs="*", type=inner[0], default=None, choices=choices,
                                help=f"{help_text} (default: {shown})")
        else:
            base = inner[0] if typing.get_origin(kind) is typing.Union else kind
            parser.add_argument(flag, type=base, default=None, choices=choices, help=f"{help_text} (default: {default})")
    parser.add_argument("--out", default="runs", help="root of the run directories (default: runs)")
    parser.add_argument("--cpu-devices", type=_positive_int, default=None,
                        help="split the CPU into this many JAX devices (with --devices all: seeds side by side)")
    parser.add_argument("--wait", nargs="?", type=float, const=float("inf"), default=0.0, metavar="SECONDS",
                        help="if another run holds the run directory, wait for it (up to SECONDS; no value: as long "
                             "as it takes) instead of refusing (default: refuse)")
    return parser


def parse_config(config_cls, argv=None, *, description: str = "", presets: Optional[dict] = None,
                 parents: Sequence[argparse.ArgumentParser] = ()):
    """``(config, out)`` from command-line flags; exits with status 2 and a message naming
    the flag on bad input, before anything is written. The flags of ``parents`` are
    accepted and left to the caller (who parses them with those parsers).

    Examples:
      >>> from lottojax.experiments.lottery import LotteryConfig
      >>> config, out = parse_config(LotteryConfig, ['--seeds', '2-3', '--rounds', '4'])
      >>> config.seeds, config.rounds, out
      ((2, 3), 4, 'runs')
    """
    return _parse(config_cls, argv, description=description, presets=presets, parents=parents)[:2]


def _parse(config_cls, argv, *, description: str, presets: Optional[dict], parents):
    """``(config, out, wait)``: :func:`parse_config` and the ``--wait`` seconds."""
    parser = build_parser(config_cls, description=description, presets=presets, parents=parents)
    args = vars(parser.parse_args(argv))
    out, cpu_devices, wait = args.pop("out"), args.pop("cpu_devices"), args.pop("wait")
    if presets:
        config_cls = presets[args.pop("preset")]
    fields = {field.name for field in dataclasses.fields(config_cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None and k in fields}
    try:
        config = config_cls(**values)
        getattr(config, "check", lambda: None)()
    except ConfigError as error:
        parser.error(f"argument --{error.field.replace('_', '-')}: {error.message}")
    if cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)  # must precede JAX's first computation
    return config, out, wait


def main(run: Callable, config_cls, argv=None, *, description: str = "", experiment: str,
         report: Callable = print, presets: Optional[dict] = None,
         parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Parses the flags, runs ``run(config, out)`` -> ``(result, workdir)`` and prints
    ``report(result)``; on Ctrl-C says how to resume (exit status 130); a run directory in
    use refuses (status 75; ``--wait`` waits); a damaged file, an unwritable or full output
    directory or bad data print their message (status 1)."""
    from lottojax.checkpoint import CorruptFileError
    from lottojax.experiments.base import DataError
    from lottojax.experiments.store import RunLockedError, run_directory, waiting

    config, out, wait = _parse(config_cls, argv, description=description, presets=presets, parents=parents)
    workdir = run_directory(out, experiment, config)
    try:
        with waiting(wait):
            result, workdir = run(config, out)
    except KeyboardInterrupt:
        print(f"\ninterrupted. Finished work is saved in {workdir}/; run the same command again to resume.",
              file=sys.stderr)
        raise SystemExit(130) from None
    except RunLockedError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(75) from None
    except (CorruptFileError, DataError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EROFS):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    report(result)
    print(f"\nresults, plots and checkpoints in {workdir}/")
