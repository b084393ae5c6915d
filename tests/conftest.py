from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_cnn.cores import usable_cores
from lightning_cnn.data.locate import _memo

if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Each of pytest-xdist's workers gets its share of the cores, and so do the processes its tests start:
    # torch's default of a thread per core in every worker oversubscribes them (30% slower, measured).
    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // int(workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # this process has read the variable already

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own cache folders, no data root from the environment, and W&B switched off (and its
    error reporting, which tests that reach for an unreachable server would otherwise trigger)."""
    monkeypatch.setenv("LIGHTNING_CNN_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("LIGHTNING_CNN_DATA", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # W&B's own error reports would go to its servers
    wandb_home = tmp_path_factory.mktemp("wandb")  # W&B's own cache, staging and settings folders
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(wandb_home / name.lower()))
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


CHECKOUT = Path(__file__).resolve().parents[1]
# What running Python and pytest leave in any checkout; everything else a test writes there is a bug.
_HARMLESS = ("__pycache__", ".egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache")


def _checkout_files() -> set[str] | None:
    """Untracked and ignored paths of the checkout (``None`` outside a git checkout, e.g. an sdist)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
            cwd=CHECKOUT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!") and not any(h in line for h in _HARMLESS)}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _checkout_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test writes into the checkout: the suite fails if the checkout gained files while it ran."""
    before = session.config.stash.get(_BEFORE, None)
    after = _checkout_files()
    if before is None or after is None:
        return
    gained = sorted(after - before)
    if gained:
        print(f"\nThe test run wrote into the checkout {CHECKOUT}: {', '.join(gained[:10])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set[str] | None]()
