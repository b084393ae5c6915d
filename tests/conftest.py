from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_cnn.data.locate import _memo

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own cache folder, no data root from the environment, and W&B switched off."""
    monkeypatch.setenv("LIGHTNING_CNN_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("LIGHTNING_CNN_DATA", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr("sys.argv", ["lightning-cnn"])  # the CLI under test gets its arguments from args=
    _memo.cache_clear()


@pytest.fixture
def real_data(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real datasets in ../shared/data (skips when absent), decoded through the user's own cache."""
    monkeypatch.delenv("LIGHTNING_CNN_CACHE")
    return shared_data_or_skip()


def shared_data_or_skip() -> Path:
    root = Path(os.environ.get("LIGHTNING_CNN_SHARED_DATA", SHARED_DATA))
    if not (root / "cifar10-jpeg").is_dir() or not (root / "MNIST").is_dir():
        pytest.skip(f"real data not present at {root}")
    return root
