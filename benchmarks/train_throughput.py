"""Training images/s of the CIFAR CNN, several ways, in one invocation on the same machine.

(a) the assignment's loop: plain PyTorch, torchvision ``ImageFolder`` + PIL transforms, ``DataLoader``, fp32,
    NCHW, SGD, batch 128;
(b) a bare PyTorch loop over resident tensors with the same batched augmentation as lightning_cnn and the
    base config's settings (channels-last), in fp32 and in bf16 autocast, at each ``--batch-sizes``: the
    compute ceilings;
(c) ``lightning-cnn fit --config cifar10_base`` in fp32 and bf16-mixed at the same batch sizes, and as shipped
    (the precision this machine picks), and the fast config as shipped and, where the machine picks bf16,
    in fp32 (its recipe on a CPU without bf16); one process each, images/s measured by the run report.

All variants are timed alike: each in a fresh process (``fit`` always is one; a loop that ran in the
benchmark's own process paid oneDNN's per-process kernel set-up only once, which flattered the bare bf16
loop), from its first batch, warm-up included; a second figure leaves the first step out, so the per-step
cost of Lightning shows apart from one-time set-up. (An earlier version also skipped 5 warm-up batches in
the loops only, which made ``fit`` look up to 29% slower in bf16 than it was.) Prints images/s with ratios
to (a) and to the bare loop of the same precision, and which precision this machine picks and why.
With ``--repeats N`` the variants run
round-robin N times
and the table shows each one's median (timings on a shared VM drift by up to 20% between minutes; interleaving
spreads that drift over all variants alike), and the share of CPU time the hypervisor took from this VM
during each run ("steal", from ``/proc/stat``; a slowed run shows it). On a GPU machine the same script
runs there (the data of (b) and (c) then stays on the GPU). Usage::

    python benchmarks/train_throughput.py --data-dir ../shared/data --batches 150 --repeats 3 --batch-sizes 64 128
    python benchmarks/train_throughput.py --data-dir ../shared/data --batches 200 --repeats 3 --time-target --compile

(``--time-target``: only the assignment loop and ``cifar10_fast``, for the time ratios and their targets.)
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from cpu_steal import with_steal
from fit_rate import fit_summary, steady_images_per_second

from lightning_cnn.experiments import shipped_config
from lightning_cnn.training.hardware import choose_precision, precision_recipes, unified_precision

CIFAR10_TRAIN_IMAGES = 50_000
ASSIGNMENT = "(a) assignment loop (PIL transforms, DataLoader, fp32)"
PRECISIONS = ("32-true", "bf16-mixed")
# cifar10_fast's training time as a share of the assignment recipe's, at most (the time-to-accuracy issue):
# where the CPU has bf16 and in fp32 (a CPU without it)
TIME_TARGETS = {"bf16-mixed": 0.125, "32-true": 0.20}


def bare_name(precision: str, batch: int) -> str:
    return f"(b) bare PyTorch loop, resident tensors, {precision}, batch {batch}"


def fit_name(precision: str, batch: int) -> str:
    return f"(c) lightning-cnn fit --config cifar10_base --trainer.precision {precision} --data.batch_size {batch}"


SHIPPED = "(c) lightning-cnn fit --config cifar10_base (as shipped: this machine's precision)"
FAST = "(c) lightning-cnn fit --config cifar10_fast (as shipped: this machine's precision and its batch)"
FAST_FP32 = "(c) lightning-cnn fit --config cifar10_fast --trainer.precision 32-true (its recipe on a CPU without bf16)"
FAST_COMPILED = "(c) lightning-cnn fit --config cifar10_fast --model.compile true (torch.compile, inductor)"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def assignment_network() -> torch.nn.Module:
    """The CIFAR CNN as the assignment wrote it: each convolution, then ReLU, then pooling. lightning_cnn's
    ``CIFARCNN`` pools before the ReLU (the same function, less work), which the baseline must not get."""
    from lightning_cnn.models import CIFARCNN

    nn = torch.nn
    net = CIFARCNN()
    convs = [m for m in net.backbone if isinstance(m, nn.Conv2d)]
    net.backbone = nn.Sequential(*[m for c in convs for m in (c, nn.ReLU(inplace=True), nn.MaxPool2d(2))], nn.Flatten())
    return net


def assignment_loop(folder: Path, batches: int, workers: int) -> tuple[float, float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    device = _device()
    transform = transforms.Compose(
        [transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=4), transforms.ToTensor()]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(folder / "train"), transform),
        batch_size=128,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    net = assignment_network().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def steps() -> Iterator[int]:
        for i, (x, y) in enumerate(loader):  # the workers start here: counted, as every variant's warm-up is
            if i == batches:
                break
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield len(y)

    return timed_rates(steps(), device)


def timed_rates(steps: Iterator[int], device: torch.device) -> tuple[float, float]:
    """Images/s of a loop's steps (each yields its batch size), from the first step and after it."""
    n, start, first = 0, time.perf_counter(), (0, 0.0)
    for i, size in enumerate(steps):
        n += size
        if i == 0:
            _sync(device)
            first = (n, time.perf_counter() - start)
    _sync(device)
    seconds = time.perf_counter() - start
    return n / seconds, (n - first[0]) / (seconds - first[1])


def bare_resident_loop(data_dir: str, batches: int, bf16: bool = False, batch: int = 128) -> tuple[float, float]:
    return timed_rates((size for size, _ in bare_steps(data_dir, batches, bf16, batch)), _device())


def bare_steps(
    data_dir: str, batches: int, bf16: bool = False, batch: int = 128, sync: bool = False
) -> Iterator[tuple[int, list[float]]]:
    """The bare loop, set up (data decoded, model built) before it returns, then one training step per item:
    its batch size and the step's clock readings (before the batch is fetched, after it is augmented, after
    forward and loss, after backward, after the optimizer step; with ``sync`` the GPU is waited for at each, so
    the readings split the step into phases)."""
    from lightning_cnn.data import CIFAR10DataModule
    from lightning_cnn.data.augment import flip_and_crop
    from lightning_cnn.data.loader import ResidentBatches
    from lightning_cnn.models import CIFARCNN

    device = _device()
    dm = CIFAR10DataModule(data_dir, download=False)
    dm.setup()
    assert dm.train_split is not None
    stream = ResidentBatches(dm.train_split, batch, train=True, pad=4, flip_p=0.5, device=device)
    net = CIFARCNN().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def clock() -> float:
        if sync:
            _sync(device)
        return time.perf_counter()

    def steps() -> Iterator[tuple[int, list[float]]]:
        epochs = (item for _ in itertools.count() for item in stream)  # epoch after epoch, as fit runs them
        for _ in range(batches):
            marks = [clock()]
            x, y, params = next(epochs)
            x = dm.normalize(flip_and_crop(x, params, 4)).contiguous(memory_format=torch.channels_last)
            marks.append(clock())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            marks.append(clock())
            opt.zero_grad()
            loss.backward()
            marks.append(clock())
            opt.step()
            marks.append(clock())
            yield len(y), marks

    return steps()


def in_fresh_process(measure: Callable[..., tuple[float, float]], *args: Any, **kwargs: Any) -> tuple[float, float]:
    """Run a measurement in a new Python process, as ``fit`` runs: each pays the same one-time set-up (oneDNN
    picks and JIT-compiles its kernels per process, which costs more for bf16 than fp32 on CPU)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    # a plain process, not a Pool's daemon worker: the assignment loop's DataLoader starts workers of its own
    process = context.Process(target=_measure_into, args=(queue, measure, args, kwargs))
    process.start()
    result = queue.get()
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _measure_into(queue: Any, measure: Callable[..., tuple[float, float]], args: tuple, kwargs: dict) -> None:
    try:
        queue.put(measure(*args, **kwargs))
    except BaseException as err:  # handed to the parent, which raises it
        queue.put(err)


def fit_rates(config: str, data_dir: str, batches: int, *extra: str) -> tuple[float, float]:
    summary = fit_summary(config, data_dir, batches, *extra)
    return float(summary["train_images_per_second"]), steady_images_per_second(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batches", type=int, default=150, help="timed training batches per variant")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the assignment loop")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin runs of every variant; medians shown")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128], help="batch sizes of (b) and (c)")
    parser.add_argument("--time-target", action="store_true",
                        help="only what the time targets need: (a) and cifar10_fast in each precision")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also cifar10_fast with torch.compile (inductor)")
    args = parser.parse_args()
    folder = next(p for p in Path(args.data_dir).iterdir() if "cifar" in p.name.lower() and (p / "train").is_dir())

    variants: dict[str, Callable[[], tuple[float, float]]] = {
        ASSIGNMENT: partial(in_fresh_process, assignment_loop, folder, args.batches, args.workers)
    }
    same: dict[str, str] = {}  # each Lightning variant -> the bare loop it is compared with
    for batch in [] if args.time_target else args.batch_sizes:
        for precision in PRECISIONS:
            bf16 = precision == "bf16-mixed"
            variants[bare_name(precision, batch)] = partial(
                in_fresh_process, bare_resident_loop, args.data_dir, args.batches, bf16=bf16, batch=batch
            )
            variants[fit_name(precision, batch)] = partial(
                fit_rates, "cifar10_base", args.data_dir, args.batches, f"--trainer.precision={precision}",
                f"--data.batch_size={batch}",
            )  # fmt: skip
            same[bare_name(precision, batch)] = same[fit_name(precision, batch)] = bare_name(precision, batch)
    if not args.time_target:
        variants[SHIPPED] = partial(fit_rates, "cifar10_base", args.data_dir, args.batches)
    variants[FAST] = partial(fit_rates, "cifar10_fast", args.data_dir, args.batches)
    choice = choose_precision("auto")
    picked = choice.precision if choice else "32-true"
    why = choice.reason if choice else "Lightning's default"
    if picked != "32-true":  # the fp32 recipe too: the time target on a CPU without bf16 is read from it
        variants[FAST_FP32] = partial(
            fit_rates, "cifar10_fast", args.data_dir, args.batches, "--trainer.precision=32-true"
        )
    if args.compile:  # "after the first step" leaves the compilation out; "all batches" pays it over --batches
        variants[FAST_COMPILED] = partial(
            fit_rates, "cifar10_fast", args.data_dir, args.batches, "--model.compile=true"
        )
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    steals: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, measure in variants.items():
            rates, steal = with_steal(measure)
            runs[name].append(rates)
            if steal is not None:
                steals[name].append(steal)
    overall = {name: statistics.median(r[0] for r in rates) for name, rates in runs.items()}
    steady = {name: statistics.median(r[1] for r in rates) for name, rates in runs.items()}
    a = overall[ASSIGNMENT]
    print(f"CIFAR CNN training, {args.batches} batches each, every variant in a fresh process, {args.repeats} "
          f"run(s), device {_device()}; this machine picks {picked} ({why})")  # fmt: skip
    print("| variant | images/s, all batches (median) | vs (a) | vs bare, same precision "
          "| images/s after the first step | vs bare, same precision | runs (all batches) | CPU steal |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---|---|")
    if bare_name(picked, 128) in variants:
        same[SHIPPED] = bare_name(picked, 128)
    for name in variants:
        each = ", ".join(f"{r[0]:,.0f}" for r in runs[name])
        stolen = ", ".join(f"{100 * st:.0f}%" for st in steals[name]) or "n/a"
        bare = f"{overall[name] / overall[same[name]]:.2f}x" if name in same else "-"
        bare_steady = f"{steady[name] / steady[same[name]]:.2f}x" if name in same else "-"
        print(f"| {name} | {overall[name]:,.0f} | {overall[name] / a:.2f}x | {bare} | {steady[name]:,.0f} "
              f"| {bare_steady} | {each} | {stolen} |")  # fmt: skip
    # The time target compares whole recipes: the assignment's 30 epochs in its own loop against the fast
    # config's epochs at this machine's precision (and at fp32, its recipe for a CPU without bf16), both at
    # the rates just measured (training time only).
    assignment_s = 30 * CIFAR10_TRAIN_IMAGES / a
    print(f"\nTraining time at these rates: the assignment's recipe (30 epochs in loop (a)) {assignment_s:,.0f} s")
    for name, precision in ((FAST, picked), (FAST_FP32, "32-true")):
        if name in overall:
            epochs = fast_epochs(precision)
            fast_s = epochs * CIFAR10_TRAIN_IMAGES / overall[name]
            ratio, target = fast_s / assignment_s, TIME_TARGETS[precision]
            print(f"cifar10_fast ({epochs} epochs in {precision}) {fast_s:,.0f} s = {ratio:.3f} of it (target <= "
                  f"{target}: {'met' if ratio <= target else 'MISSED'})")  # fmt: skip


def fast_epochs(precision: str, path: Path | None = None) -> int:
    """A recipe's epochs at a precision (``cifar10_fast``'s unless ``path`` names another config): what its
    ``by_precision`` sets for that precision, else its own ``trainer.max_epochs``."""
    config = yaml.safe_load((path or shipped_config("cifar10_fast")).read_text())
    recipes = precision_recipes(config.get("by_precision"))  # keyed as the CLI reads them: bf16 is bf16-mixed
    recipe = recipes.get(unified_precision(precision) or "") or {}
    return int(recipe.get("trainer.max_epochs", config["trainer"]["max_epochs"]))


if __name__ == "__main__":
    main()
