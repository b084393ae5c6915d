"""What the CIFAR CNN's training step costs on this CPU, by layer order and optimizer kernel.

A bare fp32 step (channels-last, batch 128, random data: no data path) in several variants, round-robin in
one process so that the VM's drift spreads over all of them; each variant's median step over the repeats,
every repeat shown:

* ``relu-pool + adamw``: the assignment's order (conv, ReLU, max-pool) and AdamW's default per-tensor step;
* ``pool-relu + adamw``: lightning_cnn's order (conv, max-pool, ReLU: the same function, see
  :func:`lightning_cnn.models.networks.conv_backbone`);
* ``pool-relu + adamw fused``: and AdamW's fused kernel (``fused=True``, as ``cifar10_fast`` sets it).

With ``--profile`` it also prints the operators that take the most time in lightning_cnn's step (from
``torch.profiler``), to see where a step goes. Usage::

    python benchmarks/step_kernels.py --steps 30 --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from train_throughput import assignment_network

from lightning_cnn.models import CIFARCNN

VARIANTS = {  # name -> (pool before ReLU, AdamW keyword arguments)
    "relu-pool + adamw": (False, {}),
    "pool-relu + adamw": (True, {}),
    "pool-relu + adamw fused": (True, {"fused": True}),
}


def network(pool_first: bool) -> nn.Module:
    return (CIFARCNN() if pool_first else assignment_network()).to(memory_format=torch.channels_last)


def training_step(pool_first: bool, adamw: dict) -> Callable[[], None]:
    """One training step of a fresh network in that order with that AdamW, on a fixed random batch."""
    torch.manual_seed(0)
    net = network(pool_first)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05, **adamw)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def step_ms(pool_first: bool, adamw: dict, steps: int, warm_up: int = 5) -> float:
    """Median milliseconds of a training step over ``steps`` steps after ``warm_up``."""
    step = training_step(pool_first, adamw)
    times = []
    for i in range(warm_up + steps):
        start = time.perf_counter()
        step()
        if i >= warm_up:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile(steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    step = training_step(True, {"fused": True})  # lightning_cnn's step, as cifar10_fast trains it
    for _ in range(5):
        step()
    with profiler(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also the top operators of lightning_cnn's step")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (pool_first, adamw) in VARIANTS.items():
            runs[name].append(step_ms(pool_first, adamw, args.steps))
    base = statistics.median(runs["relu-pool + adamw"])
    print(f"CIFAR CNN training step, fp32, channels-last, batch 128, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} repeats of {args.steps} steps")  # fmt: skip
    print("| variant | ms per step | vs the assignment's order | every repeat |")
    print("|---|---:|---:|---|")
    for name, values in runs.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}x | {', '.join(f'{v:.1f}' for v in values)} |")
    if args.profile:
        profile(args.steps)


if __name__ == "__main__":
    main()
