"""Installed like any Python package: the built wheel holds the experiments, and a non-editable install runs a
shipped experiment by name from a folder outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import lightning_cnn
from lightning_cnn.experiments import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.package,
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the project's source tree"),
]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, source = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("source") / "lightning_cnn"
    # a copy: setuptools writes build/ and *.egg-info into the tree it builds, and tests never write the checkout
    ignore = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, ignore=ignore, symlinks=True)
    # --no-isolation: build with the installed setuptools, so no network is needed
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                   check=True, capture_output=True, cwd=out)  # fmt: skip
    return out


def test_the_wheel_and_sdist_hold_what_users_and_tests_need(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"lightning_cnn/configs/{p.relative_to(CONFIG_DIR)}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert shipped and shipped <= names and "lightning_cnn/py.typed" in names
    assert f"lightning_cnn-{lightning_cnn.__version__}.dist-info/METADATA" in names
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert {"tests/conftest.py", "tests/fakedata.py", "benchmarks/fit_rate.py", "LICENSE"} <= members
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_non_editable_install_runs_a_shipped_experiment_by_name(dist: Path, tmp_path: Path) -> None:
    from fakedata import make_mnist_idx

    (wheel,) = dist.glob("*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)  # fmt: skip
    data, work = make_mnist_idx(tmp_path / "data", n_train=64, n_test=32), tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    where = subprocess.run([sys.executable, "-c", "import lightning_cnn; print(lightning_cnn.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel's copy, not the checkout
    version = subprocess.run([site / "bin" / "lightning-cnn", "--version"], env=env, capture_output=True, text=True)
    assert version.stdout.strip() == f"lightning-cnn {lightning_cnn.__version__}"
    command = [site / "bin" / "lightning-cnn", "fit", "--config", "mnist", f"--data.data_dir={data}"]
    done = subprocess.run([*command, "--trainer.fast_dev_run=true"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (work / "runs" / "mnist").iterdir()
    assert (run / "summary.json").is_file()
