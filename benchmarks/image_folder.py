"""ImageFolderDataModule: training batches per second resident vs streaming, and peak memory.

Each repeat builds the DataModule (decode or listing not timed), then times ``--batches`` training batches
made ready for the network (augmented and normalized, as ``on_after_batch_transfer`` does in a fit); the
modes alternate within each repeat, so both see the same machine. Peak RSS: this process and the largest
DataLoader worker. Run one mode per invocation for its own peak memory.

    python benchmarks/image_folder.py --data-dir ../shared/data/cifar10-jpeg --batches 100 --repeats 3
    python benchmarks/image_folder.py --make 200000 --data-dir /tmp/many --image-size 64 --modes streaming
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_cnn.data import ImageFolderDataModule


def make_folder(root: Path, n: int, size: int = 64, classes: int = 10) -> None:
    """``n`` random JPEGs of ``size`` pixels in ``classes`` class folders, train/ and test/ (a tenth)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        split = "test" if (i // classes) % 10 == 0 else "train"
        folder = root / split / f"class{i % classes}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:07d}.jpg")


class _Training:
    training = True

    class precision_plugin:  # the trainer's attribute name
        convert_input = staticmethod(lambda images: images)


def batches_per_second(data_dir: str, image_size: int, mode: str, batches: int, workers: int) -> float:
    budget = 0.0 if mode == "streaming" else None
    dm = ImageFolderDataModule(data_dir, image_size=image_size, memory_budget_gb=budget, num_workers=workers,
                               batch_size=128, val_fraction=0.01)  # fmt: skip
    dm.setup()

    loader = iter(dm.train_dataloader())
    dm.trainer = _Training()  # type: ignore[assignment]  # what on_after_batch_transfer asks of a trainer
    next(loader)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        dm.on_after_batch_transfer(next(loader), 0)  # augmented and normalized, as in a fit
    return batches * 128 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["resident", "streaming"])
    parser.add_argument("--make", type=int, default=0, help="first write this many random JPEGs into --data-dir")
    args = parser.parse_args()
    if args.make:
        start = time.perf_counter()
        make_folder(Path(args.data_dir), args.make, args.image_size)
        print(f"wrote {args.make:,} images in {time.perf_counter() - start:.0f} s")
    rates: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for _ in range(args.repeats):
        for mode in args.modes:
            rates[mode].append(batches_per_second(args.data_dir, args.image_size, mode, args.batches, args.workers))
    print(f"\n{args.data_dir} at {args.image_size}x{args.image_size}, batch 128, {args.batches} batches, "
          f"{args.workers} workers when streaming")  # fmt: skip
    print("| mode | images/s (median) | every repeat |\n|---|---:|---|")
    for mode, values in rates.items():
        print(f"| {mode} | {statistics.median(values):,.0f} | {', '.join(f'{v:,.0f}' for v in values)} |")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
    print(f"peak RSS: this process {own:,.0f} MiB, largest worker {workers:,.0f} MiB")


if __name__ == "__main__":
    main()
