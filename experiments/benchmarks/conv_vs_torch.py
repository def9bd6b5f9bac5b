"""Convolutional training steps: lottojax's compiled loop vs eager PyTorch, side by side.

    python experiments/benchmarks/conv_vs_torch.py                          # every row, ~30 min on 2 cores
    python experiments/benchmarks/conv_vs_torch.py --nets conv2 --inputs mnist --batch 60 --repeats 5
    python experiments/benchmarks/conv_vs_torch.py --conv-impl native --nets conv2 --steps 2

For each net (Conv-2, Conv-4, Conv-6, VGG-16, ResNet-20), input (``mnist`` 28x28x1,
``cifar`` 32x32x3) and batch size it times ``--steps`` training steps (Adam, learning rate
1e-3, softmax cross-entropy, minibatches drawn from a random data set of ``4 * batch``
examples):

- lottojax: one call of the compiled ``Trainer.run_steps`` (a ``lax.scan`` over the steps,
  ``optax.chain(optax.adam, lottojax.masked_updates())``, convolutions by
  ``--conv-impl``, ``'auto'`` by default: the patches gradient on CPU);
- PyTorch: the same architecture (same layers, widths, BatchNorm, pooling) and a
  ``torch.optim.Adam`` stepped eagerly ``--steps`` times, ``torch.set_num_threads(--torch-threads)``.

The two cases run interleaved (``lottojax.timing.interleaved``: ``--warmup`` untimed rounds,
then ``--repeats`` rounds in alternating order), so load from other processes falls on
both. Per row it prints the median milliseconds per step of each side, the median of the
paired ratios lottojax/PyTorch with its distribution-free 95% interval (below 1: lottojax
is faster), and XLA's temporary memory of the compiled loop; every figure goes to
``<--out>/benchmarks/conv_vs_torch.json``. The PyTorch side needs the ``[torch]`` extra.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Optional

import jax
import numpy as np
import optax

import lottojax as lj
from lottojax.data import Dataset
from lottojax.models import create
from lottojax.models.vgg import VGG_CONFIGS
from lottojax.timing import Comparison, interleaved
from lottojax.train import make_trainer

NETS = ("conv2", "conv4", "conv6", "vgg16", "resnet20")
INPUTS = {"mnist": (28, 28, 1), "cifar": (32, 32, 3)}
CONV_WIDTHS = {"conv2": (64, 64), "conv4": (64, 64, 128, 128), "conv6": (64, 64, 128, 128, 256, 256)}


def random_data(input_shape: tuple[int, ...], n: int, seed: int = 0) -> Dataset:
    """``n`` Gaussian inputs with uniform labels over 10 classes (the same arrays for val/test)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return Dataset(x, y, x[:16], y[:16], x[:16], y[:16])


def torch_net(torch, name: str, input_shape: tuple[int, ...], num_classes: int = 10):
    """The PyTorch twin of ``lottojax.models.create(name)`` (NCHW; same layers and widths)."""
    nn = torch.nn
    h, w, c = input_shape
    if name in CONV_WIDTHS:
        layers = []
        for i, width in enumerate(CONV_WIDTHS[name]):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
            c = width
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(h * w * c, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                   nn.Linear(256, num_classes)]
        return nn.Sequential(*layers)
    if name.startswith("vgg"):
        layers = []
        for v in VGG_CONFIGS[int(name[3:])]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        return nn.Sequential(*layers)
    if name == "resnet20":
        class Block(nn.Module):
            def __init__(self, c_in, c_out, stride):
                super().__init__()
                self.conv0 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
                self.bn0 = nn.BatchNorm2d(c_out)
                self.conv1 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(c_out)
                self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                                 if stride != 1 or c_in != c_out else nn.Identity())

            def forward(self, x):
                y = torch.relu(self.bn0(self.conv0(x)))
                return torch.relu(self.bn1(self.conv1(y)) + self.shortcut(x))

        layers = [nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        c = 16
        for s, width in enumerate((16, 32, 64)):
            for b in range(3):
                layers.append(Block(c, width, 2 if s > 0 and b == 0 else 1))
                c = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        return nn.Sequential(*layers)
    raise ValueError(f"no PyTorch twin for {name!r}; expected one of {NETS}")


def lottojax_case(name: str, input_shape, batch: int, steps: int, conv_impl: str, data: Dataset):
    """A zero-argument callable running ``steps`` compiled steps, and XLA's memory figures."""
    model = create(name, input_shape=input_shape, conv_impl=conv_impl)
    trainer = make_trainer(model, optax.chain(optax.adam(1e-3), lj.masked_updates()),
                           batch_size=batch, eval_every=steps)
    state = trainer.init(jax.random.key(0))
    data = jax.device_put(data)
    key = jax.random.key(1)
    compiled = jax.jit(lambda s, d: trainer.run_steps(s, d, key, 0, steps)).lower(state, data).compile()
    stats = compiled.memory_analysis()
    memory = {} if stats is None else {
        "temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes)}
    return (lambda: compiled(state, data)[1]), memory


def torch_case(torch, name: str, input_shape, batch: int, steps: int, data: Dataset):
    """A zero-argument callable running ``steps`` eager PyTorch training steps."""
    torch.manual_seed(0)
    net = torch_net(torch, name, input_shape)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(data.x_train), -1, 1)))
    y = torch.from_numpy(np.asarray(data.y_train).astype(np.int64))
    n = len(y)
    generator = torch.Generator().manual_seed(0)

    def run():
        order = torch.randperm(n, generator=generator)
        for i in range(steps):
            idx = order[(i * batch) % (n - batch + 1):][:batch]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    return run


def row(torch, name: str, input_name: str, batch: int, args) -> dict:
    input_shape = INPUTS[input_name]
    data = random_data(input_shape, 4 * batch)
    cases, memory = {}, {}
    cases["lottojax"], memory = lottojax_case(name, input_shape, batch, args.steps, args.conv_impl, data)
    if torch is not None:
        cases["torch"] = torch_case(torch, name, input_shape, batch, args.steps, data)
    timings = interleaved(cases, repeats=args.repeats, warmup=args.warmup)
    title = f"{name} {'x'.join(map(str, input_shape))} batch {batch}"
    result = {"net": name, "input": input_name, "input_shape": list(input_shape), "batch": batch,
              "steps_per_repeat": args.steps, "memory": memory}
    if torch is None:
        result["lottojax"] = timings["lottojax"].as_dict(args.steps)
        return result
    comparison = Comparison(title, "step", args.steps, timings, "lottojax", "torch", "lottojax/torch", ("<=", 1.0))
    result["comparison"] = comparison.as_dict()
    return result


def format_rows(rows: list[dict]) -> str:
    """The table: one line per (net, input, batch)."""
    lines = [f"{'net':<9} {'input':<8} {'batch':>5} {'lottojax ms/step':>17} {'torch ms/step':>14} "
             f"{'ratio lottojax/torch (95% interval)':>37}  {'XLA temp MiB':>12}"]
    for r in rows:
        temp = r["memory"].get("temp_bytes")
        temp = "" if temp is None else f"{temp / 2**20:.0f}"
        if "comparison" in r:
            cases, ratio = r["comparison"]["cases"], r["comparison"]["ratio"]
            ours, theirs = (cases[k]["median_per_unit_s"] * 1e3 for k in ("lottojax", "torch"))
            interval = ratio["paired_interval_95"]
            spread = "n/a" if interval is None else f"{interval[0]:.2f}–{interval[1]:.2f}"
            text = f"{ratio['paired_median']:.2f} ({spread})"
            lines.append(f"{r['net']:<9} {r['input']:<8} {r['batch']:>5} {ours:>17.1f} {theirs:>14.1f} {text:>37}  {temp:>12}")
        else:
            ours = r["lottojax"]["median_per_unit_s"] * 1e3
            lines.append(f"{r['net']:<9} {r['input']:<8} {r['batch']:>5} {ours:>17.1f} {'-':>14} {'-':>37}  {temp:>12}")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--batch", nargs="+", type=int, default=[60, 128])
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed call")
    parser.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (6+ give a 95%% interval)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true", help="time lottojax alone")
    parser.add_argument("--conv-impl", default="auto", choices=("auto", "native", "patches"))
    parser.add_argument("--out", default="runs", help="writes <out>/benchmarks/conv_vs_torch.json")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print('PyTorch is not installed (pip install -e ".[torch]"); timing lottojax alone.')
        else:
            torch.set_num_threads(args.torch_threads)
    rows = []
    for name in args.nets:
        for input_name in args.inputs:
            for batch in args.batch:
                rows.append(row(torch, name, input_name, batch, args))
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    table = format_rows(rows)
    print("\n" + table)
    path = os.path.join(args.out, "benchmarks", "conv_vs_torch.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"config": vars(args), "backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch_threads": None if torch is None else args.torch_threads,
                   "rows": rows, "table": table}, f, indent=1)
    print(f"\nwritten to {path}")
    return rows


if __name__ == "__main__":
    main()
