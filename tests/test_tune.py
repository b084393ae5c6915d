"""``lightning-cnn tune``: a W&B sweep file searched on Optuna, trials as runs, pruning, storage that continues."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fakedata import QUICK, free_port, make_mnist_idx

from lightning_cnn.cli import main

optuna = pytest.importorskip("optuna", reason="the tune extra (pip install 'lightning-cnn[tune]') is not installed")

from lightning_cnn import tune  # noqa: E402  (needs the extra)
from lightning_cnn.experiments import CONFIG_DIR  # noqa: E402

EXE = shutil.which("lightning-cnn")
EPOCHS = 2
TRIAL = [*QUICK, "--trainer.logger=false", f"--trainer.max_epochs={EPOCHS}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mnist_idx(tmp_path_factory.mktemp("data"), n_train=64, n_test=32)


def write_space(folder: Path, parameters: dict, **extra: object) -> Path:
    space = {"name": "lr-search", "method": "random", "metric": {"name": "val/acc", "goal": "maximize"},
             "parameters": parameters, **extra}  # fmt: skip
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


LR = {"model.optimizer.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}


def test_the_shipped_sweep_file_is_a_search_space() -> None:
    space = tune.read_space(CONFIG_DIR / "sweeps/cifar10_dropout.yaml")
    assert (space.method, space.metric, space.maximize, space.min_epochs) == ("bayes", "val/acc", True, 5)
    trial = optuna.trial.FixedTrial({"model.optimizer.init_args.lr": 0.001, "data.init_args.batch_size": "128",
                                     "model.network.init_args.dropout": "[0.2, 0.2, 0.1]"})  # fmt: skip
    assert space.suggest(trial) == {"model.optimizer.init_args.lr": 0.001, "data.init_args.batch_size": 128,
                                    "model.network.init_args.dropout": [0.2, 0.2, 0.1]}  # fmt: skip
    assert isinstance(space.pruner(), optuna.pruners.SuccessiveHalvingPruner)


def test_a_pruned_trial_is_a_shorter_finished_run_recorded_as_pruned(data: Path, tmp_path: Path) -> None:
    """Optuna's threshold pruner prunes every trial below accuracy 1.1: the trial stops after its first epoch."""
    space = tune.read_space(write_space(tmp_path, LR))
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.1))
    objective = tune.Objective(["mnist"], space, "lr-search", tmp_path / "runs", [f"--data.data_dir={data}", *TRIAL])
    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["pruned_at_epoch"] == 0
    run = Path(trial.user_attrs["run"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 < EPOCHS and "test/acc" in summary["test"]  # a whole run, one epoch long
    assert run.parent == tmp_path / "runs"
    one_epoch = [f"--data.data_dir={data}", *TRIAL, "--trainer.max_epochs=1"]  # judged after its last epoch only
    study.optimize(tune.Objective(["mnist"], space, "lr-search", tmp_path / "runs", one_epoch), n_trials=1)
    assert study.trials[1].state == optuna.trial.TrialState.COMPLETE  # nothing left to save: not pruned


BAD = [
    ("unknown parameter key", {"model.optimizer.init_args.lrr": {"values": [0.1]}}, {}, "lrr"),
    ("empty space", {}, {}, "has no parameters to search"),
    ("min above max", {"model.optimizer.init_args.lr": {"min": 0.1, "max": 0.01}}, {}, "min 0.1 is above max 0.01"),
    ("a key tune cannot honour", LR, {"early_terminate": {"type": "median"}}, "tune honours type: hyperband"),
    ("a distribution tune cannot honour", {"x": {"distribution": "q_normal", "mu": 0}}, {}, "'q_normal' cannot be"),
    ("grid over a range", LR, {"method": "grid"}, "method grid needs values"),
]


@pytest.mark.parametrize(("case", "parameters", "extra", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(
    case: str, parameters: dict, extra: dict, message: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    space = write_space(tmp_path, parameters, **extra)
    with pytest.raises(SystemExit) as stop:
        main(["tune", "--config", "mnist", "--space", str(space), "--dir", str(tmp_path / "runs"),
              f"--data.data_dir={data}", *TRIAL])  # fmt: skip
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs" / "lr-search").exists() or not list((tmp_path / "runs" / "lr-search").glob("2*"))


def test_a_storage_that_cannot_be_reached_is_one_line_after_a_bounded_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("psycopg", reason="no PostgreSQL driver")
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        main(["tune", "--config", "mnist", "--space", str(write_space(tmp_path, LR)),
              "--storage", f"postgresql://tune:secret@127.0.0.1:{port}/db"])  # fmt: skip
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "cannot be used" in err and "secret" not in err, err
    assert time.monotonic() - start < 2 * tune.STORAGE_WAIT_SECONDS + 30


def test_a_search_of_that_name_over_another_space_is_refused(tmp_path: Path) -> None:
    storage = tune.storage_for(None, tmp_path)
    tune.open_study(storage, "s", tune.read_space(write_space(tmp_path, LR)), seed=0)
    other = tune.read_space(write_space(tmp_path, {"model.optimizer.init_args.lr": {"values": [0.1, 0.01]}}))
    with pytest.raises(tune.ConfigError, match="exists in this storage with another space"):
        tune.open_study(storage, "s", other, seed=0)


@pytest.mark.slow
def test_parallel_workers_on_the_embedded_storage_run_each_trial_once_and_report(data: Path, tmp_path: Path) -> None:
    space = tune.read_space(write_space(tmp_path, {"model.optimizer.init_args.lr": {"values": [1e-3, 3e-3, 1e-2]}}))
    root = tmp_path / "runs" / "lr-search"
    study = tune.search(["mnist"], space, "lr-search", root, [f"--data.data_dir={data}", *TRIAL], trials=4, workers=2)
    finished = [
        t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert 4 <= len(finished) <= 5  # a second worker may start one more while the fourth finishes
    runs = [t.user_attrs["run"] for t in finished]
    assert len(set(runs)) == len(runs) and all((Path(r) / "summary.json").is_file() for r in runs)
    text = tune.report(study, root)
    assert "| trial | state | val/acc |" in text and (root / "trials.md").is_file() and (root / "history.png").is_file()
    from lightning_cnn import launch

    launch.check_options(str(root / "best.yaml"))  # the best trial's config runs as is


def _wait_for(condition: object, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow
@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_rerunning_continues_the_search_and_retries_a_killed_trial(data: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, {"model.optimizer.init_args.lr": {"values": [1e-3, 3e-3]}})
    command = [EXE, "tune", "--config", "mnist", "--space", str(space), "--trials", "2", f"--data.data_dir={data}",
               *TRIAL, "--trainer.max_epochs=30"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: any((tmp_path / "runs/lr-search").glob("2*/checkpoints/last.ckpt")))
    first.send_signal(signal.SIGKILL)  # no chance to record anything: the trial stays "running"
    first.wait()
    time.sleep(3 * tune.HEARTBEAT_SECONDS + 1)  # its heartbeat is now stale
    command[-1] = f"--trainer.max_epochs={EPOCHS}"
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="lr-search", storage=tune.storage_for(None, tmp_path / "runs/lr-search"))
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL  # the killed one
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params == study.trials[0].params
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 2
    assert "| trial | state |" in done.stdout


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    candidates = [Path(found).parent] if found else [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    return next((c for c in candidates if (c / "pg_ctl").exists()), None)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1, started for the test (Debian's postgresql package)."""
    pytest.importorskip("psycopg", reason="no PostgreSQL driver (psycopg)")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # the server refuses to run as root
    folder = Path(tempfile.mkdtemp(prefix="tune-pg-"))
    try:
        if as_user:
            shutil.chown(folder, "postgres")
        data = folder / "data"
        subprocess.run([*as_user, bindir / "initdb", "-D", data, "-A", "trust", "-U", "tune"], check=True,
                       capture_output=True)  # fmt: skip
        port = free_port()
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-o", options, "-w", "-l", folder / "log", "start"],
                       check=True, capture_output=True)  # fmt: skip
        try:
            yield f"postgresql://tune@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_workers_that_open_a_new_database_together_all_get_the_storage(postgres: str) -> None:
    """A SLURM array's tasks start at once: they race to create Optuna's tables (PostgreSQL refuses the losers)."""
    import threading

    import psycopg

    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute("CREATE DATABASE race")
    url, barrier, errors = postgres.rsplit("/", 1)[0] + "/race", threading.Barrier(6), []

    def open_storage() -> None:
        barrier.wait()
        try:
            tune.storage_for(url, Path("unused"))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=open_storage) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


@pytest.mark.slow
@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_two_workers_join_one_search_in_postgresql(postgres: str, data: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, {"model.optimizer.init_args.lr": {"values": [1e-3, 3e-3, 1e-2]}})
    command = [EXE, "tune", "--config", "mnist", "--space", str(space), "--trials", "4", "--storage", postgres,
               f"--data.data_dir={data}", *TRIAL]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, cwd=tmp_path / name, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
               for name in ("a", "b") if (tmp_path / name).mkdir() is None]  # fmt: skip  # two machines' folders
    assert [w.wait(timeout=600) for w in workers] == [0, 0], [w.stderr.read()[-2000:] for w in workers if w.stderr]
    study = optuna.load_study(study_name="lr-search", storage=postgres)
    finished = [t for t in study.trials if t.state != optuna.trial.TrialState.RUNNING]
    assert len(finished) == len(study.trials) and 4 <= len(finished) <= 5  # none lost, none left running
    runs = [t.user_attrs["run"] for t in finished]
    assert len(set(runs)) == len(runs)  # none run twice
    assert {Path(r).parents[2].name for r in runs} == {"a", "b"}  # both workers took trials


def test_a_search_whose_trials_keep_wandb_runs_gets_a_summary_run_in_their_group(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    space = tune.read_space(write_space(tmp_path, {"model.optimizer.init_args.lr": {"values": [1e-3]}}))
    root = tmp_path / "runs" / "lr-search"
    trial = [a for a in TRIAL if a != "--trainer.logger=false"]  # the config's W&B logger, offline
    verbosity = optuna.logging.get_verbosity()
    study = tune.search(["mnist"], space, "lr-search", root, [f"--data.data_dir={data}", *trial], trials=1)
    assert optuna.logging.get_verbosity() == verbosity  # a search from Python leaves Optuna's logging as it was
    run = Path(study.trials[0].user_attrs["run"])
    assert list((run / "wandb").glob("offline-run-*"))
    tune.report(study, root)
    (summary,) = (root / "wandb").glob("offline-run-*lr-search-search")
    assert summary.is_dir()
