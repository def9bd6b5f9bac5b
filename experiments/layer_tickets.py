"""Layer tickets (Jordao et al.): remove the lowest-scoring residual blocks of a ResNet at
initialisation (SNIP, GraSP signed or absolute, |θ| or random block scores), train the
shallower net, and compare accuracy, parameters, FLOPs and step time with the dense net.

    python experiments/layer_tickets.py                          # Fashion-MNIST 14x14, ResNet (3,3,3), 3 seeds
    python experiments/layer_tickets.py --scorers snip random --counts 2 --seeds 5
    python experiments/layer_tickets.py --downsample 1 --num-steps 2000   # full 28x28 images, longer

Scores every block of each seed's initial ResNet, removes 1-4 (--counts) of the blocks not
next to downsampling, and trains each resulting net (Adam 1.2e-3, batch 32, 300 steps by
default; one training per seed and distinct set of removed blocks). Prints a table (test
accuracy mean ± std over seeds, parameters, forward FLOPs per example, median training-step
time of the architectures, distinct block sets) and writes results, the table and a plot of
accuracy and step time vs blocks removed to the run directory. Re-running the same command
resumes.
"""
from lottojax.experiments import cli
from lottojax.experiments.layer_tickets import LayerTicketConfig, layer_ticket_table, run_layer_tickets


def main(argv=None) -> None:
    cli.main(run_layer_tickets, LayerTicketConfig, argv, description=__doc__, experiment="layer_tickets",
             report=lambda summary: print(layer_ticket_table(summary)))


if __name__ == "__main__":
    main()
