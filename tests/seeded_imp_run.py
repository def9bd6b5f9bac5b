"""Runs a tiny IMP and saves its results: the driver of the multi-device tests in
test_seeds.py (a fresh process, so XLA_FLAGS and jax.distributed take effect).

    python tests/seeded_imp_run.py OUT.npz --strategy map [--devices all] [--process I --processes N --port P]
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--strategy", default="vmap")
    parser.add_argument("--devices", default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--process", type=int, default=None)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    if args.process is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process)

    import jax.numpy as jnp
    import numpy as np
    import optax

    import lottojax as lj
    from lottojax.data import Dataset
    from lottojax.imp import run_imp
    from lottojax.models import create
    from lottojax.train import make_trainer

    x = jax.random.normal(jax.random.key(0), (400, 10))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (10, 4)), -1)
    data = Dataset(*(np.asarray(a) for a in (x[:240], y[:240], x[240:320], y[240:320], x[320:], y[320:])))
    trainer = make_trainer(create("mlp", input_shape=(10,), hidden=(32,), num_classes=4),
                           optax.chain(optax.adam(5e-3), lj.masked_updates()), batch_size=24, eval_every=10)
    result = run_imp(trainer, data, seeds=range(args.seeds), rounds=2, fraction=lj.rates_by_layer(conv=.1, dense=.5, output=.25),
                     num_steps=40, rewind_step=10, seed_strategy=args.strategy, devices=args.devices,
                     checkpoint_dir=args.checkpoint, progress=False)
    if jax.process_index() == 0:
        arrays = {k: v for k, v in result._asdict().items() if isinstance(v, np.ndarray)}
        arrays["val_loss"] = result.history.val_loss
        arrays["mask"] = np.concatenate([np.asarray(m).reshape(len(result.seeds), -1) for m in jax.tree.leaves(result.masks[-1])], 1)
        np.savez(args.out, devices=jax.device_count(), processes=jax.process_count(), **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
