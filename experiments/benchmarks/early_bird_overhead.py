"""What Early-Bird detection costs inside the compiled training loop, as a fraction of an epoch.

    python experiments/benchmarks/early_bird_overhead.py                 # MNIST-1D 1D-CNN, 1 and 5 seeds
    python experiments/benchmarks/early_bird_overhead.py --repeats 9 --seeds 1 5 15

For each mask kind (channel masks from BatchNorm scales; per-weight global magnitude masks)
and number of vmapped seeds, with the paper's three ratios, window 5 and eps 0.1, it times
(medians over repeats, the three programs timed round-robin after a warm-up call each,
compiled ahead of time):

- ``epoch``: one epoch of the compiled loop without detection;
- ``epoch+EB``: one epoch of the same loop with detection in the carry;
- ``detect``: the detection alone (all seeds' masks for every ratio, pushed into the
  detectors), a separately compiled program;

- ``steps``: the epoch's training steps as separate calls of one compiled (vmapped) step.

It prints the detection's share of an epoch (``detect / epoch``, the robust figure), the
measured difference of the two loops (``epoch+EB / epoch - 1``, noisier), and the share of
the separately called steps (``detect / steps``). On CPU, XLA runs convolution gradients
inside loop bodies far slower than at the top level of a program (jax-ml/jax#12868), so a
compiled epoch of a conv net is much slower than its steps called one by one; the last
column is the share against that faster epoch, the conservative figure.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from lottojax.data import load
from lottojax.early_bird import channel_mask, weight_mask
from lottojax.eb_train import make_epoch_loop
from lottojax.experiments.early_bird import EarlyBirdConfig, make_eb_optimizer
from lottojax.models import create
from lottojax.timing import interleaved
from lottojax.train import make_trainer

MASKS = {
    "channel": lambda p, r: channel_mask(p, r),
    "weight": lambda p, r: weight_mask(p, r, scope="global"),
}


def measure(mask: str, seeds: int, repeats: int, data, config: EarlyBirdConfig) -> dict:
    steps = data.x_train.shape[0] // config.batch_size
    model = create(config.model, input_shape=data.input_shape, num_classes=data.num_classes)
    trainer = make_trainer(model, make_eb_optimizer(config, steps, config.penalty), batch_size=config.batch_size,
                           eval_every=steps)
    args = dict(batch_size=config.batch_size, num_epochs=10**6, evaluate=False)
    plain = make_epoch_loop(trainer, **args)
    detecting = make_epoch_loop(trainer, **args, mask_fn=MASKS[mask], ratios=config.ratios,
                                window=config.window, eps=config.eps)
    keys = jax.random.split(jax.random.key(0), seeds)
    train = jax.jit(jax.vmap(trainer.init))(keys)
    runs = []
    for loop in (plain, detecting):
        state = jax.jit(loop.init)(train)
        run = jax.jit(loop.run).lower(state, data, keys, jnp.int32(0)).compile()
        until = state.epoch + 1  # every call trains one epoch from the same state
        runs.append(lambda run=run, state=state, until=until: run(state, data, keys, until))
    state = jax.jit(detecting.init)(train)
    detect = jax.jit(jax.vmap(detecting.detect, (0, 0, None))).lower(train.params, state.detector, jnp.int32(1)).compile()
    runs.append(lambda: detect(train.params, state.detector, jnp.int32(1)))
    batch = (data.x_train[:config.batch_size], data.y_train[:config.batch_size])
    step = jax.jit(jax.vmap(trainer.step, (0, None, None))).lower(train, *batch).compile()
    runs.append(lambda: [step(train, *batch) for _ in range(steps)][-1])
    timings = interleaved(dict(zip(("epoch", "epoch+EB", "detect", "steps"), runs)), repeats=repeats)
    return {name: timing.median for name, timing in timings.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--masks", nargs="*", default=list(MASKS), choices=list(MASKS))
    args = parser.parse_args(argv)
    config = EarlyBirdConfig()
    data = jax.device_put(load(config.dataset))
    print(f"{config.model} on {config.dataset}: {data.x_train.shape[0] // config.batch_size} steps of batch "
          f"{config.batch_size} per epoch; ratios {config.ratios}, window {config.window}; "
          f"{jax.devices()[0].platform}, median of {args.repeats}")
    print(f"{'mask':<8} {'seeds':>5} {'epoch ms':>9} {'epoch+EB ms':>11} {'detect ms':>9} {'steps ms':>9} "
          f"{'detect/epoch':>12} {'epoch+EB/epoch-1':>16} {'detect/steps':>12}")
    for mask in args.masks:
        for seeds in args.seeds:
            t = measure(mask, seeds, args.repeats, data, config)
            print(f"{mask:<8} {seeds:>5} {1e3 * t['epoch']:>9.1f} {1e3 * t['epoch+EB']:>11.1f} {1e3 * t['detect']:>9.2f} "
                  f"{1e3 * t['steps']:>9.1f} {t['detect'] / t['epoch']:>12.2%} {t['epoch+EB'] / t['epoch'] - 1:>16.2%} "
                  f"{t['detect'] / t['steps']:>12.2%}")


if __name__ == "__main__":
    main()
