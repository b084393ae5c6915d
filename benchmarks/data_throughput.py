"""Images/s of the CIFAR-10 training-batch stream: lightning_cnn's data path against the assignment's.

(a) the assignment's pipeline: torchvision ``ImageFolder`` + PIL transforms (flip, padded crop, ToTensor,
    Normalize) + ``DataLoader`` with shuffling, batch 128;
(b) lightning_cnn: ``CIFAR10DataModule`` resident uint8 tensor, batched flip + crop + normalize, on one thread.

Also prints the first-batch latency of an epoch and the time of a second ``setup()`` (a new process reading
the decode cache). Usage::

    python benchmarks/data_throughput.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch


def assignment_pipeline(folder: Path, batch_size: int, workers: int, batches: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomCrop(32, padding=4),
            transforms.ToTensor(),
            transforms.Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(folder / "train"), transform), batch_size, shuffle=True, num_workers=workers
    )
    it = iter(loader)
    next(it)  # worker start-up is not counted
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)[1])
    return n / (time.perf_counter() - start)


def resident_stream(data_dir: str, batch_size: int, epochs: int) -> tuple[float, float]:
    from lightning_cnn.data import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir, batch_size=batch_size, download=False)
    dm.setup()
    loader = dm.train_dataloader()
    rates, firsts = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start, n, first = time.perf_counter(), 0, None
        for batch in loader:
            _, y = dm.on_after_batch_transfer(batch, 0)
            first = first if first is not None else time.perf_counter() - start
            n += len(y)
        rates.append(n / (time.perf_counter() - start))
        firsts.append(first or 0.0)
    return max(rates), max(firsts)


def second_setup_seconds(data_dir: str) -> float:
    code = (
        "import time; from lightning_cnn.data import CIFAR10DataModule as D; t=time.perf_counter(); "
        f"D({data_dir!r}, download=False).setup(); print(time.perf_counter()-t)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # fills the cache if empty
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the assignment pipeline")
    parser.add_argument("--baseline-batches", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    folder = next(p for p in Path(args.data_dir).iterdir() if "cifar" in p.name.lower() and (p / "train").is_dir())

    setup_s = second_setup_seconds(args.data_dir)
    torch.set_num_threads(1)
    ours, first = resident_stream(args.data_dir, args.batch_size, args.epochs)
    torch.set_num_threads(2)
    theirs = assignment_pipeline(folder, args.batch_size, args.workers, args.baseline_batches)

    print(f"CIFAR-10 training batches of {args.batch_size}, flip + 4px-padded crop + normalize, from {folder}")
    print("| pipeline | images/s |\n|---|---:|")
    print(f"| (a) assignment: ImageFolder + PIL transforms + DataLoader ({args.workers} workers) | {theirs:,.0f} |")
    print(f"| (b) lightning_cnn resident stream, 1 thread | {ours:,.0f} |")
    print(f"ratio (b)/(a): {ours / theirs:.1f}x")
    print(f"first batch of an epoch (worst of {args.epochs}): {first * 1000:.1f} ms")
    print(f"second setup() of CIFAR-10 from the image folder (new process, decode cache): {setup_s:.2f} s")


if __name__ == "__main__":
    main()
