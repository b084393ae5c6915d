"""Run the experiments in configs/ on real data and write the results table in Markdown.

Each config runs through the CLI exactly as a user runs it (``lightning-cnn fit --config ...``: fit, then
test of the best checkpoint) in its own process, one after another, into ``--out``. The table lists
test accuracy, weighted precision/recall/F1, epochs, wall time and training images/s, with the
assignment's published figures beside them. Usage::

    python benchmarks/reproduce.py --data-dir ../shared/data --out results
    python benchmarks/reproduce.py --configs mnist mnist_fast   # a subset, in this order
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from lightning_cnn.cores import usable_cores

# The split phases must run in this order: phase 2 transfer reads phase 1's checkpoint.
ORDER = [
    "mnist",
    "mnist_fast",
    "split_cifar10_phase1",
    "split_cifar10_phase2_transfer",
    "split_cifar10_phase2_scratch",
    "split_cifar10_phase2_finetune",
    "cifar10_fast",
    "cifar10_base",
    "cifar10_base_batch64",
    "cifar10_base_he_batch64",
    "cifar10_base_he_cosine",
    "cifar10_base_he_batch64_cosine",
    "cifar10_dropout",
    "cifar10_dropout_he_batch64",
]
PUBLISHED = {
    "mnist": "99.02%",
    "cifar10_base": "82.16%",
    "cifar10_base_batch64": "82.16%",
    "cifar10_base_he_batch64": "82.16%",
    "cifar10_base_he_cosine": "82.16%",
    "cifar10_base_he_batch64_cosine": "82.16%",
}
FIGURES = ("acc", "precision_weighted", "recall_weighted", "f1_weighted")


def run(config: str, data_dir: str, out: Path, extra: list[str]) -> None:
    log = out / "logs" / f"{config}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lightning_cnn", "fit", "--config", config,
           f"--data.data_dir={Path(data_dir).resolve()}", "--trainer.enable_progress_bar=false", *extra]  # fmt: skip
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=out, stdout=f, stderr=subprocess.STDOUT)
    status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode}, see {log})"
    print(f"{config}: {status} in {time.perf_counter() - start:.0f} s", flush=True)


def table(out: Path, configs: list[str]) -> str:
    columns = (
        "experiment | test acc | published | precision (w) | recall (w) | F1 (w) | epochs | wall time | train img/s"
    )
    lines = [f"| {columns} |", "|---|" + "---:|" * 8]
    for config in configs:
        path = out / "runs" / config / "latest" / "summary.json"  # the newest finished run
        if not path.is_file():
            lines.append(f"| {config} | not run | {PUBLISHED.get(config, '-')} |  |  |  |  |  |  |")
            continue
        s = json.loads(path.read_text())
        t = s.get("test", {})
        pct = {k: f"{100 * t[f'test/{k}']:.2f}%" if f"test/{k}" in t else "-" for k in FIGURES}
        lines.append(
            f"| {config} | {pct['acc']} | {PUBLISHED.get(config, '-')} | {pct['precision_weighted']} | "
            f"{pct['recall_weighted']} | {pct['f1_weighted']} | {s.get('epochs', '-')} | "
            f"{s.get('fit_seconds', 0):.0f} s | {s.get('train_images_per_second', 0):,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--configs", nargs="*", default=ORDER)
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments after -- go to every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    if not args.table_only:
        for config in args.configs:
            run(config, args.data_dir, args.out, extra)
    text = table(args.out, args.configs)
    machine = f"{platform.processor() or platform.machine()}, {usable_cores()} CPUs, Python {platform.python_version()}"
    (args.out / "results.md").write_text(f"Machine: {machine}\n\n{text}")
    print(text, end="")


if __name__ == "__main__":
    main()
