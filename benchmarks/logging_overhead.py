"""What W&B logging costs in training time: the same short run with the config's W&B logger and without.

Runs ``lightning-cnn fit`` on ``--config`` for ``--batches`` training batches, alternating logger on
(W&B offline, ``--trainer.log_every_n_steps`` as given) and off (``--trainer.logger=false``), ``--repeats``
times each, and prints the training images/s of each (from the run report) and the overhead. Usage::

    python benchmarks/logging_overhead.py --data-dir ../shared/data --config mnist --batches 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(config: str, data_dir: str, batches: int, every: int, logger: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "lightning_cnn", "fit", "--config", str(CONFIGS / f"{config}.yaml"),
            f"--data.data_dir={Path(data_dir).resolve()}", "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=0", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", f"--trainer.log_every_n_steps={every}",
            f"--trainer.default_root_dir={out}/run", f"--checkpoint.dirpath={out}/ckpt",
        ]  # fmt: skip
        if logger:
            cmd.append(f"--trainer.logger.init_args.save_dir={out}/run")
        else:
            cmd.append("--trainer.logger=false")
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        subprocess.run(cmd, check=True, capture_output=True, cwd=out, env=env)
        return float(json.loads((Path(out) / "run" / "summary.json").read_text())["train_images_per_second"])


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
