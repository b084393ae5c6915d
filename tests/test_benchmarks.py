"""The benchmarks' shared fit helper still runs the CLI as the benchmarks expect (on fake data)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fakedata import make_mnist_idx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fit_rate import fit_images_per_second


@pytest.mark.parametrize("wandb", [False, True])
def test_fit_rate_reports_training_images_per_second(tmp_path: Path, wandb: bool) -> None:
    make_mnist_idx(tmp_path, n_train=256, n_test=32)
    rate = fit_images_per_second("mnist", str(tmp_path), 2, "--data.batch_size=64", wandb=wandb)
    assert rate > 0
