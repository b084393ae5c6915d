"""W&B logging as users get it: offline runs recorded and readable, configs saved, no secrets written."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fakedata import free_port, make_image_folder
from wandb_files import read_run

from lightning_cnn.cli import main, run
from lightning_cnn.experiments import CONFIG_DIR

CONFIGS = CONFIG_DIR  # the shipped configs, wherever the package is installed
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    return make_image_folder(tmp_path / "data" / "cifar10", per_class_train=10, per_class_test=2)


def _fit(root: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "split_cifar10_phase1.yaml"), f"--data.data_dir={root}",
          "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.log_every_n_steps=1",
          "--trainer.enable_progress_bar=false", "--data.batch_size=10"])  # fmt: skip


def test_offline_run_records_config_history_and_test_pictures(offline: Path, tmp_path: Path) -> None:
    _fit(offline)
    runs = sorted((tmp_path / "runs/split_cifar10_phase1/latest/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = read_run(runs[0])
    config = record["config"]
    assert config["model"]["network"]["class_path"] == "lightning_cnn.models.CIFARCNN"  # the resolved CLI config
    assert config["data"]["init_args"]["phase"] == 1 and config["trainer"]["max_epochs"] == 2
    history = record["history"]
    steps = [row["_step"] for row in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # an axis that only increases
    global_steps = [row["trainer/global_step"] for row in history if "trainer/global_step" in row]
    assert global_steps == sorted(global_steps)
    keys = {k for row in history for k in row}
    expected = ["train/loss_step", "train/loss_epoch", "val/acc", "val/f1_weighted", "test/acc", "test/f1_weighted"]
    expected += ["test/confusion_matrix_table", "test/per_class", "test/confusion_matrix_image", "test/samples"]
    for key in expected:
        assert key in keys, key
    chart = next(row["test/confusion_matrix_table"] for row in history if "test/confusion_matrix_table" in row)
    assert chart["_type"] == "table-file" and chart["ncols"] == 3  # the W&B confusion-matrix chart's data
    val_epochs = [row["epoch"] for row in history if "val/acc" in row]
    assert val_epochs == [0, 1]  # per epoch
    assert (tmp_path / "runs/split_cifar10_phase1/latest/config.yaml").is_file()
    # the W&B run id is the run folder's name, so resuming the run continues this W&B run
    assert runs[0].name.endswith((tmp_path / "runs/split_cifar10_phase1/latest").resolve().name)


def test_each_in_process_run_finishes_its_wandb_run(
    offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's WandbLogger reuses an open ``wandb.run``: a run left open would swallow the next run's logging."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    _fit(offline)  # a disabled run leaves a stand-in run object behind unless it is finished
    assert wandb.run is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    _fit(offline)
    (run,) = (tmp_path / "runs/split_cifar10_phase1/latest/wandb").glob("offline-run-*")
    assert "model" in read_run(run)["config"] and wandb.run is None
    with wandb.init(mode="offline", dir=tmp_path / "mine", project="mine") as mine:  # a caller's own run, e.g.
        _fit(offline)  # a sweep agent's function: Lightning logs into it and it is left open for its owner
        assert wandb.run is mine
    wandb.teardown()  # the caller's run: waiting for W&B to write it out is the caller's part (finish does not)
    (run,) = (tmp_path / "mine/wandb").glob("offline-run-*")
    assert "model" in read_run(run)["config"]


def test_two_runs_in_a_row_and_no_api_key_in_any_file(offline: Path, tmp_path: Path) -> None:
    _fit(offline)
    _fit(offline)
    assert len(list((tmp_path / "runs/split_cifar10_phase1").glob("2*/wandb/offline-run-*"))) == 2
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert written
    assert not [p for p in written if FAKE_KEY.encode() in p.read_bytes()]


def test_compare_reads_offline_wandb_runs(offline: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fit(offline)
    run = next((tmp_path / "runs/split_cifar10_phase1/latest/wandb").glob("offline-run-*"))
    capsys.readouterr()
    main(["compare", str(run), "runs/split_cifar10_phase1/latest", "--output=t.md", "--plot=t.png"])
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert len(lines) == 4
    # the W&B run and the run folder describe the same run: same figures after the name
    assert lines[2].split("|")[2:] == lines[3].split("|")[2:]


def test_no_account_means_offline_with_a_sync_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    from lightning_cnn.reporting.wandb_logger import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path / "run"))
    assert logger.experiment.offline  # the run starts, recorded offline
    logger.experiment.finish()
    wandb.teardown()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert f"wandb sync {tmp_path / 'run' / 'wandb' / 'offline-run-*'}" in "".join(capfd.readouterr())
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    online = WandbLogger(save_dir=str(tmp_path / "run"))  # an account: online as configured (not started here)
    assert online.init_kwargs["mode"] is None and "WANDB_MODE" not in os.environ


def _wandb_login(home: Path, *host: str) -> dict[str, str]:
    """``wandb login`` as a user runs it (the key stored, not checked with a server); returns that user's env."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "NETRC")}
    env["HOME"] = str(home)
    login = [sys.executable, "-m", "wandb", "login", "--no-verify", *host, FAKE_KEY]
    subprocess.run(login, env=env, check=True, capture_output=True, timeout=120)
    return env


@pytest.mark.parametrize("host", [[], ["--host", "http://127.0.0.1:{port}"]], ids=["default-host", "own-server"])
def test_a_key_stored_by_wandb_login_is_found(host: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb 0.31 stores the key under its current cloud host (no longer api.wandb.ai), or under the server
    `--host` names, which it keeps in its settings file: W&B's own lookup finds both, a lookup by hand did not."""
    import wandb

    from lightning_cnn.reporting.wandb_logger import WandbLogger

    env = _wandb_login(tmp_path, *[h.format(port=free_port()) for h in host])
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", env["HOME"])
    wandb.teardown()  # W&B's settings and session of the tests before, which had keys of their own
    try:
        logger = WandbLogger(save_dir=str(tmp_path / "run"))  # not started: no traffic to any server
        assert not logger.no_key and logger.init_kwargs["mode"] is None
    finally:
        wandb.teardown()


@pytest.mark.slow
def test_fit_after_wandb_login_goes_online_and_falls_back_when_the_server_is_away(tmp_path: Path) -> None:
    import shutil
    import subprocess

    env = _wandb_login(tmp_path, "--host", f"http://127.0.0.1:{free_port()}")
    root = make_image_folder(tmp_path / "data" / "cifar10", per_class_train=4, per_class_test=2)
    fit = [shutil.which("lightning-cnn") or "lightning-cnn", "fit", "--config", "split_cifar10_phase1",
           f"--data.data_dir={root}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
           "--trainer.enable_progress_bar=false", "--test_after_fit=false"]  # fmt: skip
    done = subprocess.run(fit, env={**env, "WANDB_INIT_TIMEOUT": "3"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no API key" not in done.stderr and "the server could not be reached" in done.stderr
    assert list((tmp_path / "runs/split_cifar10_phase1/latest/wandb").glob("offline-run-*"))


class _FakeApiRun:
    """What ``wandb.Api().run(path)`` returns, reduced to what compare reads (no server in tests)."""

    name = "cifar10_base"
    summary = {"test/acc": 0.8216, "parameters": 537610, "epochs": 30, "_wandb": {"runtime": 3}}

    def scan_history(self, keys: list[str]) -> list[dict[str, float]]:
        return [{"epoch": 4, "val/acc": 0.5}, {"epoch": 9, "val/acc": 0.7}]


def test_compare_reads_an_online_wandb_run_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    asked: list[str] = []

    class FakeApi:
        def __init__(self, timeout: int | None = None) -> None: ...

        def run(self, path: str) -> _FakeApiRun:
            asked.append(path)
            return _FakeApiRun()

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.chdir(tmp_path)
    main(["compare", "https://wandb.ai/me/lightning-cnn/runs/abc123", "me/lightning-cnn/def456", "--output=t.md"])
    assert asked == ["me/lightning-cnn/abc123", "me/lightning-cnn/def456"]
    row = (tmp_path / "t.md").read_text().splitlines()[2]
    assert row.startswith("| cifar10_base | 82.16% |") and "537,610" in row
    assert list(tmp_path.iterdir()) == [tmp_path / "t.md"]  # no picture unless asked for with --plot


def test_compare_explains_a_wandb_run_it_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import wandb

    def unreachable(timeout: int | None = None) -> None:
        raise wandb.errors.CommError("Could not connect to api.wandb.ai")

    monkeypatch.setattr(wandb, "Api", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "me/lightning-cnn/abc123"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "me/lightning-cnn/abc123 is no folder here" in err and "Could not connect" in err
    assert not (tmp_path / "comparison.md").exists()


def test_a_resumed_run_continues_its_wandb_run_in_its_own_folder(offline: Path, tmp_path: Path) -> None:
    args = ["fit", "--config", "split_cifar10_phase1", f"--data.data_dir={offline}", "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false", "--data.batch_size=10", "--test_after_fit=false"]  # fmt: skip
    main([*args, "--trainer.max_epochs=1"])
    time.sleep(1.1)  # W&B names a run's offline folders by the second: a resume in the same second shares one
    main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    (run,) = [p for p in (tmp_path / "runs/split_cifar10_phase1").iterdir() if not p.is_symlink()]
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{run.name}") for p in parts)  # one W&B run id, two parts
    assert read_run(parts[1])["config"]["ckpt_path"].endswith("last.ckpt")


def test_an_in_process_run_is_on_disk_whole_when_main_returns(offline: Path, tmp_path: Path) -> None:
    # W&B's run.finish() returns before its service process has written the run file out; read at once, a run
    # could come back empty (CI: a resumed run's config without its keys). main() returns once it is all there.
    args = ["fit", "--config", "split_cifar10_phase1", f"--data.data_dir={offline}", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.batch_size=10",
            "--test_after_fit=false", "--trainer.max_epochs=1"]  # fmt: skip
    for attempt in range(3):  # the race was rare (about one read in 30): three reads give it three chances
        main(args)
        latest = (tmp_path / "runs/split_cifar10_phase1/latest/wandb").resolve()
        (part,) = latest.glob("offline-run-*")
        record = read_run(part)
        assert record["exit_code"] == 0 and "ckpt_path" in record["config"], attempt
        assert any("val/acc" in row for row in record["history"]), attempt


def _an_unreachable_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B pointed at a port on this machine that nothing listens on, with a key; returns a data root."""
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.chdir(tmp_path)
    return make_image_folder(tmp_path / "data" / "cifar10", per_class_train=4, per_class_test=2)


@pytest.mark.slow
def test_an_unreachable_wandb_server_means_offline_after_a_bounded_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import time

    import wandb

    root = _an_unreachable_server(tmp_path, monkeypatch)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    start = time.monotonic()
    main(["fit", "--config", "split_cifar10_phase1", f"--data.data_dir={root}", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false"])  # fmt: skip
    wandb.finish()
    assert time.monotonic() - start < 60
    assert "the server could not be reached" in "".join(capfd.readouterr())
    assert list((tmp_path / "runs/split_cifar10_phase1/latest/wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_the_cli_gives_wandb_the_documented_init_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """LightningCLI passes settings=None into the logger, so W&B's own 90 s applied, not the documented 30 s."""
    import wandb

    root = _an_unreachable_server(tmp_path, monkeypatch)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    cli = run(["fit", "--config", "split_cifar10_phase1", f"--data.data_dir={root}", "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false",
               "--test_after_fit=false"])  # fmt: skip
    wandb.finish()
    (logger,) = cli.trainer.loggers
    assert logger.init_kwargs["settings"].init_timeout == 30  # what reached wandb.init through the CLI
    assert "the server could not be reached" in "".join(capfd.readouterr())
