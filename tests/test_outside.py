"""The installed ``lightning-cnn`` as a shell, a scheduler or a sweep agent runs it: in a subprocess, from a
temporary working directory, judged by its exit status and the files it leaves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fakedata import QUICK, make_data_root, mounted_tmpfs, write_hostile_configs

from lightning_cnn.experiments import CONFIG_DIR

EXE = shutil.which("lightning-cnn")
pytestmark = pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"), per_class_train=6)


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_CNN_RUN_ID"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **extra}


def cli(cwd: Path, *args: str, timeout: int = 120, **env: str) -> subprocess.CompletedProcess[str]:
    assert EXE is not None
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def _runs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())


def test_a_successful_fit_exits_0_and_leaves_its_run_folder(data: Path, cwd: Path) -> None:
    done = cli(cwd, "fit", "--config", "mnist", f"--data.data_dir={data}", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = _runs(cwd / "runs" / "mnist")
    assert (cwd / "runs/mnist/latest").resolve() == run
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.yaml", "summary.json", "history.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # readable by the team as umask says
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith(run.name)  # the W&B run id is the run id
    for noise in ("litlogger", "Seed set to", "LeafSpec", "deprecated", "not supported by the model summary"):
        assert noise not in done.stderr, noise  # third-party messages a user cannot act on
    before = (run / "checkpoints/last.ckpt").read_bytes()
    again = cli(cwd, "fit", "--config", str(run / "config.yaml"))  # its config reruns it, as a new run beside it
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(_runs(cwd / "runs" / "mnist")) == 2 and (run / "checkpoints/last.ckpt").read_bytes() == before


def test_bad_input_exits_2_with_one_line(data: Path, cwd: Path) -> None:
    # one mistake from the outside; the in-process table in test_cli has every kind
    message = "Option 'bach_size' is not accepted. See lightning-cnn fit --help"
    done = cli(cwd, "fit", "--config", "mnist", f"--data.data_dir={data}", "--data.bach_size=3")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("lightning-cnn: error:") and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr
    assert not (cwd / "runs").exists() or not any((cwd / "runs").rglob("*"))  # no half-started run left behind


def _interrupted_training(data: Path, cwd: Path, signum: int) -> tuple[list[str], int, str]:
    """A long fit, sent ``signum`` once an epoch is done (the run has trained): its arguments, status, stderr.

    It validates at its last epoch only, so the signal lands in training (one in a validation saves no
    checkpoint: test_faults has that case)."""
    args = ["fit", "--config", "mnist", f"--data.data_dir={data}", "--data.batch_size=8", "--trainer.max_epochs=500",
            "--trainer.check_val_every_n_epoch=1000", "--trainer.enable_progress_bar=false", "--test_after_fit=false",
            "--trainer.logger=false"]  # fmt: skip
    assert EXE is not None
    process = subprocess.Popen([EXE, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not list(cwd.glob("runs/mnist/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return args, process.returncode, err.decode()


def test_sigterm_exits_143_and_the_run_resumes_in_its_own_folder(data: Path, cwd: Path) -> None:
    args, status, err = _interrupted_training(data, cwd, signal.SIGTERM)
    assert status == 143, err[-2000:]
    (run,) = _runs(cwd / "runs" / "mnist")
    interrupted = torch.load(run / "checkpoints/last-interrupted.ckpt", weights_only=True)
    assert not (cwd / "runs/mnist/latest").exists()  # not a finished run
    more = ["--trainer.max_epochs", str(interrupted["epoch"] + 2), "--ckpt_path=last"]
    resumed = cli(cwd, *args, *more)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader that cannot resume mid-epoch
    assert _runs(cwd / "runs" / "mnist") == [run] and (cwd / "runs/mnist/latest").resolve() == run
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"] == interrupted["epoch"] + 1


@pytest.mark.slow  # the SIGTERM test above runs by default; Ctrl-C goes through Lightning's own handler
def test_ctrl_c_exits_130_and_leaves_a_checkpoint_that_resumes(data: Path, cwd: Path) -> None:
    _, status, err = _interrupted_training(data, cwd, signal.SIGINT)  # what Ctrl-C sends
    assert status == 130, err[-2000:]  # as shells report Ctrl-C; 1 is for crashes
    assert "interrupted (Ctrl-C); resume with the same command and --ckpt_path last" in err
    (run,) = _runs(cwd / "runs" / "mnist")
    assert (run / "checkpoints/last-interrupted.ckpt").is_file()


@pytest.mark.slow  # the mechanism (exclusive creation) is tested in-process in test_cli
def test_two_runs_of_one_config_started_together_get_two_folders(data: Path, cwd: Path) -> None:
    assert EXE is not None
    command = [EXE, "fit", "--config", "mnist", f"--data.data_dir={data}", *QUICK]
    processes = [subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    runs = _runs(cwd / "runs" / "mnist")
    assert len(runs) == 2 and all((r / "checkpoints/best.ckpt").is_file() for r in runs)


@pytest.mark.slow  # in-process, test_cli runs every phase-2 config through a latest pointer
def test_phase2_takes_phase1_through_the_latest_pointer(data: Path, cwd: Path) -> None:
    common = [f"--data.data_dir={data / 'cifar10'}", *QUICK, "--trainer.logger=false"]
    assert cli(cwd, "fit", "--config", "split_cifar10_phase1", *common).returncode == 0
    done = cli(cwd, "fit", "--config", "split_cifar10_phase2_transfer", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    phase1 = torch.load(cwd / "runs/split_cifar10_phase1/latest/checkpoints/best.ckpt", weights_only=True)
    phase2 = torch.load(cwd / "runs/split_cifar10_phase2_transfer/latest/checkpoints/last.ckpt", weights_only=True)
    backbone = [k for k in phase1["state_dict"] if k.startswith("network.backbone.")]
    assert backbone and all(torch.equal(phase1["state_dict"][k], phase2["state_dict"][k]) for k in backbone)


@pytest.mark.slow  # in-process, test_cli parses every sweep parameter as W&B writes it
def test_a_sweep_trial_runs_as_the_wandb_agent_starts_it(data: Path, cwd: Path) -> None:
    sweep = yaml.safe_load((CONFIG_DIR / "sweeps" / "cifar10_dropout.yaml").read_text())
    picks = {k: (v["values"][0] if "values" in v else v["min"]) for k, v in sweep["parameters"].items()}
    args = [f"--{key}={value}" for key, value in picks.items()]  # W&B's ${args}: --key=value
    command = [a for part in sweep["command"] for a in (args if part == "${args}" else [part]) if part != "${env}"]
    assert command[:2] == ["lightning-cnn", "fit"]
    extra = [f"--data.data_dir={data / 'cifar10'}", *QUICK]
    assert EXE is not None
    trials = [  # two agents at once, each given its trial's run id by W&B
        subprocess.Popen([EXE, *command[1:], *extra], cwd=cwd, env=_env(WANDB_RUN_ID=run_id), stdout=subprocess.DEVNULL)
        for run_id in ("trial0001", "trial0002")
    ]
    assert [t.wait(timeout=120) for t in trials] == [0, 0]
    runs = _runs(cwd / "runs" / "cifar10_dropout")
    assert [r.name for r in runs] == ["trial0001", "trial0002"]  # each trial its own folder and W&B run
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["optimizer"]["init_args"]["lr"] == picks["model.optimizer.init_args.lr"]
        assert next((run / "wandb").glob("offline-run-*")).name.endswith(run.name)


RECIPE = """\
extends: {base}
by_precision:  # whatever precision this machine picks, the recipe applies
  32-true: {{trainer.max_epochs: 3, {batch_key}: 16}}
  bf16-mixed: {{trainer.max_epochs: 3, {batch_key}: 16}}
"""


@pytest.mark.slow  # two processes (30 s); test_hardware holds the same rule in process
@pytest.mark.parametrize(
    ("base", "batch_key"), [("mnist", "data.init_args.batch_size"), ("cifar10_fast", "data.batch_size")]
)
def test_a_later_config_wins_over_an_earlier_configs_precision_recipe(
    data: Path, cwd: Path, base: str, batch_key: str
) -> None:
    """jsonargparse's rule, as README and docs/models.md promise it: a later config file wins, by_precision too."""
    (cwd / "recipe.yaml").write_text(RECIPE.format(base=base, batch_key=batch_key))
    (cwd / "mine.yaml").write_text("trainer:\n  max_epochs: 1\ndata:\n  init_args:\n    batch_size: 8\n")
    root = data / "cifar10" if base.startswith("cifar") else data
    limits = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--data.data_dir={root}",
              "--data.eval_batch_size=8"]  # fmt: skip
    done = cli(cwd, "fit", "--config", "recipe.yaml", "--config", "mine.yaml", *limits)
    assert done.returncode == 0, done.stderr[-2000:]
    run = (cwd / "runs/recipe/latest").resolve()  # the experiment is the first config's name, not its base's
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 1 and config["data"]["init_args"]["batch_size"] == 8
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    alone = cli(cwd, "fit", "--config", "recipe.yaml", *limits, "--print_config")  # the recipe does apply
    assert alone.returncode == 0, alone.stderr[-2000:]
    lines = [line for line in alone.stdout.splitlines() if not line.startswith(("Precision:", "Recipe for"))]
    printed = yaml.safe_load("\n".join(lines))
    assert printed["trainer"]["max_epochs"] == 3 and printed["data"]["init_args"]["batch_size"] == 16


def test_a_variant_without_an_experiment_key_runs_as_its_own_experiment(data: Path, cwd: Path) -> None:
    (cwd / "mnist_wide.yaml").write_text("extends: mnist\ndata:\n  init_args:\n    batch_size: 16\n")
    (cwd / "short.yaml").write_text("trainer:\n  max_epochs: 1\n")  # an override composed after it
    done = cli(cwd, "fit", "--config", "mnist_wide.yaml", "--config", "short.yaml", f"--data.data_dir={data}", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (cwd / "runs/mnist").exists()  # nothing in the base experiment's folder, its latest untouched
    assert len(_runs(cwd / "runs/mnist_wide")) == 1
    saved = yaml.safe_load((cwd / "runs/mnist_wide/latest/config.yaml").read_text())
    assert saved["experiment"] == "mnist_wide"


@pytest.mark.slow  # the mechanism in-process: test_cli's test of the same files
def test_a_hostile_or_broken_config_file_is_refused_in_one_line_in_bounded_time(cwd: Path) -> None:
    """A config is untrusted input: bounded time and memory, one line, exit 2."""
    for name, message in write_hostile_configs(cwd):
        done = cli(cwd, "fit", "--config", name, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["--help"], ["--version"], ["experiments"], ["compare", "runs/mnist"]])
def test_commands_that_train_nothing_do_not_load_torch_or_lightning(cwd: Path, command: list[str]) -> None:
    """--help, --version, experiments and compare answer at once: importing Lightning takes seconds (6-12 s here)."""
    (cwd / "runs/mnist/r1").mkdir(parents=True)
    (cwd / "runs/mnist/r1/summary.json").write_text('{"run": "r1", "test": {"test/acc": 0.9}}')
    (cwd / "runs/mnist/latest").symlink_to("r1")
    heavy = "sorted(m for m in ('torch', 'lightning', 'wandb') if m in sys.modules)"
    probe = "\n".join(["import sys", "from lightning_cnn.cli import main", "try:", f"    main({command!r})",
                        "except SystemExit:", "    pass", f"print('LOADED', {heavy})"])  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "LOADED []", done.stdout[-2000:]


@pytest.mark.slow
def test_a_read_only_home_never_fails_a_finished_run(data: Path, cwd: Path) -> None:
    """W&B stages its media under $HOME; on a read-only home a finished run ended in W&B's PermissionError (exit 1)
    and latest was not moved. Tracking degrades to one line instead."""
    with mounted_tmpfs(cwd / "home", "ro,size=1m") as home:
        env = {k: v for k, v in _env().items() if not k.startswith("WANDB_") or k == "WANDB_ERROR_REPORTING"}
        env.update(HOME=str(home), WANDB_MODE="offline", WANDB_SILENT="true")
        assert EXE is not None
        done = subprocess.run([EXE, "fit", "--config", "mnist", f"--data.data_dir={data}", *QUICK], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "W&B: could not record" in done.stderr
    assert (cwd / "runs/mnist/latest/summary.json").is_file()
