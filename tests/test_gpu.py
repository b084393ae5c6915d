"""The GPU path: tests marked gpu run on a CUDA machine (benchmarks/gpu_check.sh runs them there) and skip
cleanly elsewhere; the GPU check script itself runs here in its dry mode, so it cannot rot."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from fakedata import QUICK, make_data_root

from lightning_cnn.cli import run

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"), per_class_train=8)


def _fit(data: Path, out: Path, *extra: str) -> Any:
    settings = ["--data.batch_size=16", "--trainer.logger=false", f"--trainer.default_root_dir={out}"]
    return run(["fit", "--config", "cifar10_gpu", f"--data.data_dir={data / 'cifar10'}", *QUICK, *settings, *extra])


@pytest.mark.gpu
@cuda
def test_the_gpu_recipe_keeps_data_on_the_card_in_bf16_with_compile(data: Path, tmp_path: Path) -> None:
    cli = _fit(data, tmp_path)
    assert cli.trainer.precision == "bf16-mixed" and cli.model.compile_network
    stream = cli.datamodule.train_dataloader()
    assert stream.images.device.type == "cuda"  # resident: batches never cross the bus
    keys = torch.load(tmp_path / "latest" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in keys)  # compiled, with plain checkpoint keys


@pytest.mark.gpu
@cuda
def test_deterministic_mode_repeats_a_gpu_run_exactly(data: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        _fit(data, tmp_path / name, "--trainer.deterministic=true", "--model.compile=false")
    a, b = (torch.load(tmp_path / n / "latest" / "checkpoints" / "last.ckpt", weights_only=True) for n in "ab")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.slow
def test_the_gpu_check_script_runs_in_dry_mode(data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DATA": str(data), "OUT": str(tmp_path / "out"), "WANDB_MODE": "disabled"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = (tmp_path / "out" / "gpu_results.md").read_text()
    for section in ("## Tests marked gpu", "## Throughput", "## Recipes", "| mnist_gpu |", "| cifar10_gpu |"):
        assert section in results, section
    assert "FAILED" not in results and "images/s" in results
