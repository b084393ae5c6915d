"""What W&B logging costs in training time: the same short run with the config's W&B logger and without.

Runs ``lightning-cnn fit`` on ``--config`` for ``--batches`` training batches, alternating logger on
(W&B offline, ``--trainer.log_every_n_steps`` as given) and off (``--trainer.logger=false``), ``--repeats``
times each, and prints the training images/s of each (from the run report) and the overhead. Usage::

    python benchmarks/logging_overhead.py --data-dir ../shared/data --config mnist --batches 300
"""

from __future__ import annotations

import argparse
import statistics

from fit_rate import fit_images_per_second


def run(config: str, data_dir: str, batches: int, every: int, logger: bool) -> float:
    return fit_images_per_second(config, data_dir, batches, f"--trainer.log_every_n_steps={every}", wandb=logger)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="trainer.log_every_n_steps")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for logger in (False, True):
            rates[logger].append(run(args.config, args.data_dir, args.batches, args.every, logger))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"{args.config}, {args.batches} training batches, log_every_n_steps={args.every}, W&B offline")
    print("| logging | training images/s (median) | runs |\n|---|---:|---|")
    print(f"| off (--trainer.logger=false) | {off:,.0f} | {', '.join(f'{r:,.0f}' for r in rates[False])} |")
    print(f"| W&B (config's logger) | {on:,.0f} | {', '.join(f'{r:,.0f}' for r in rates[True])} |")
    print(f"logging cost: {100 * (off - on) / off:+.1f}% of training time")


if __name__ == "__main__":
    main()
