"""The fast CIFAR-10 recipe's levers, one row each: train each variant of ``cifar10_fast`` and test it.

Every (variant, seed) trains through the package's Python run API (:func:`lightning_cnn.launch.fit`, as
``lightning-cnn fit`` does) into ``--out``; a run already finished there is read, not trained again, so the
command can be stopped and rerun, and the final table built from runs trained on other days. Each finished
run is then evaluated on the test split under each test-time augmentation (the views averaged: plain, the
mirror image, and the mirror with 1- or 2-pixel shifts), which needs no retraining. Prints one Markdown
row per variant and evaluation: test accuracy per seed, mean, minimum, and fit seconds (not a speed
figure while other work shares the cores; time ratios come from ``train_throughput.py``). Usage::

    python benchmarks/recipe_ablation.py --data-dir ../shared/data --out ablation --epochs 12 --seeds 0 1 2 \\
        --variants pad2
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_cnn import launch
from lightning_cnn.export import evaluation_data, load_trained
from lightning_cnn.models import WhitenFirstConv
from lightning_cnn.models.networks import averaged_logits
from lightning_cnn.reporting.record import RunRecord, markdown_table
from lightning_cnn.study import Step, run_step
from lightning_cnn.training.runs import best_checkpoint

# variant -> the callbacks it trains cifar10_fast with, in place of the config's (a new object each run), and
# its dotted overrides of the config. "pad2" is the shipped recipe; "whiten" is the one before it (crops from
# the assignment's 4-pixel padding); "base" is that without the first layer's whitening. The rest are one lever
# each on top of the shipped recipe: "nowhiten" drops the whitening, "ema" evaluates an exponential moving
# average of the weights (Lightning's EMAWeightAveraging, decay 0.999: a horizon of ~2.5 of the 391 steps an
# epoch), "smooth2" trains with label smoothing 0.2 (airbench's) instead of 0.1, "plainlast" trains the last
# epoch on the images as they are (no flip, no crop).
PAD2 = {"data.init_args.pad": 2}
PAD4 = {"data.init_args.pad": 4}
VARIANTS: dict[str, tuple[Callable[[], list[Any]], dict[str, Any]]] = {
    "base": (list, PAD4),
    "whiten": (lambda: [WhitenFirstConv()], PAD4),
    "pad2": (lambda: [WhitenFirstConv()], PAD2),
    "nowhiten": (list, PAD2),
    "ema": (lambda: [WhitenFirstConv(), EMAWeightAveraging(decay=0.999)], PAD2),
    "smooth2": (lambda: [WhitenFirstConv()], {**PAD2, "model.label_smoothing": 0.2}),
    "plainlast": (lambda: [WhitenFirstConv()], {**PAD2, "data.init_args.plain_last_epochs": 1}),
}
# name -> (flip, translate pixels) of the test-time views
EVALUATIONS = {"plain": (False, 0), "flip": (True, 0), "flip+shift1": (True, 1), "flip+shift2": (True, 2)}


def train(
    out: Path, variant: str, epochs: int, seed: int, data_dir: str, precision: str | None = None, **settings: Any
) -> RunRecord:
    """Train one variant's run as a study's step (read when finished, resumed when interrupted: the study's own
    :func:`~lightning_cnn.study.run_step`); ``precision``: forced (and then part of the run's name), else the
    machine's pick; ``settings``: more dotted overrides."""
    recipe = {
        "trainer.max_epochs": epochs,
        "trainer.check_val_every_n_epoch": epochs,
        "data.init_args.data_dir": data_dir,
        "trainer.logger": False,
        "trainer.callbacks": [],  # the config's (WhitenFirstConv): each variant names its own
        **VARIANTS[variant][1],
        **({"trainer.precision": precision} if precision else {}),
        **settings,
    }

    def fit(config: str, overrides: Mapping[str, Any], args: Sequence[str], group: str) -> RunRecord:
        return launch.fit(config, {**overrides, **recipe}, args, group, callbacks=VARIANTS[variant][0]())

    name = f"{variant}-e{epochs}" + (f"-{precision}" if precision else "")
    return run_step(Step(name, "cifar10_fast", seed), out, out.name, None, (), fit)


def evaluate(record: RunRecord, data_dir: str) -> dict[str, float]:
    """Test accuracy of the run's best checkpoint under each of :data:`EVALUATIONS`, in the precision the run
    trained and tested in (bf16 autocast for a ``bf16-mixed`` run, as Lightning tests it)."""
    assert record.folder is not None
    model = load_trained(best_checkpoint(record.folder))
    datamodule = evaluation_data(model, data_dir)
    right = dict.fromkeys(EVALUATIONS, 0)
    total = 0
    network = model.network.to(memory_format=torch.channels_last)
    bf16 = record.summary.get("precision") == "bf16-mixed"
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for images, labels in datamodule.test_dataloader():
            x = datamodule.normalize(images).contiguous(memory_format=torch.channels_last)
            for name, (flip, shift) in EVALUATIONS.items():
                right[name] += int((averaged_logits(network, x, flip, shift).argmax(1) == labels).sum())
            total += len(labels)
    return {name: count / total for name, count in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("ablation"))
    parser.add_argument("--epochs", type=int, nargs="+", default=[12])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["whiten", "pad2"])
    parser.add_argument("--precision", help="train in this precision (default: the one this machine picks)")
    parser.add_argument("--train-only", action="store_true", help="train the runs, skip the evaluation table")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    rows = []
    for variant in args.variants:
        for epochs in args.epochs:
            records = [train(args.out, variant, epochs, seed, data_dir, args.precision) for seed in args.seeds]
            if args.train_only:
                continue
            figures = [evaluate(record, data_dir) for record in records]
            seconds = [float(r.summary.get("fit_seconds", float("nan"))) for r in records]
            for name in EVALUATIONS:
                accuracies = [f[name] for f in figures]
                rows.append([
                    variant, str(epochs), "/".join(sorted({str(r.summary.get("precision")) for r in records})), name,
                    ", ".join(f"{a:.2%}" for a in accuracies),
                    f"{statistics.mean(accuracies):.2%}", f"{min(accuracies):.2%}",
                    ", ".join(f"{s:,.0f}" for s in seconds),
                ])  # fmt: skip
    if rows:
        seeds = ", ".join(map(str, args.seeds))
        header = ["variant", "epochs", "precision", "test-time views", f"test acc (seeds {seeds})", "mean", "min",
                  "fit s"]  # fmt: skip
        print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
