"""DDP as users launch it, through the installed executable with a shipped config and its W&B logger (offline):
Lightning's own spawning, torchrun, two nodes on one machine. Each run must end with exit status 0, one run
folder, one W&B run and the test figures of one process; none may hang (the watchdog and a timeout stop it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from fakedata import free_port, make_image_folder

from lightning_cnn.cli import run

EXE = shutil.which("lightning-cnn")
TORCHRUN = shutil.which("torchrun")
pytestmark = [pytest.mark.ddp, pytest.mark.skipif(EXE is None, reason="lightning-cnn is not installed")]
# 10 classes x 3 test images = 30, batch 4: ranks get 15 each in uneven batches (4, 4, 4, 3)
ARGS = ["--config", "cifar10_base", "--data.batch_size=4", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        "--trainer.limit_train_batches=3", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--hang_watchdog.timeout=90"]  # fmt: skip
LIMIT = 300  # seconds; past it the ranks' stacks are printed and the test fails


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "cifar10", per_class_train=8, per_class_test=3)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_CNN_RUN_ID"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def _launch(commands: list[list[str]], cwd: Path, extra_env: list[dict[str, str]] | None = None) -> None:
    """Start the commands together (one per node or rank) and require every one to exit 0 within LIMIT."""
    envs = extra_env or [{}] * len(commands)
    procs = [_start(cmd, cwd, env) for cmd, env in zip(commands, envs, strict=True)]
    _wait(procs)
    for proc in procs:
        assert proc.returncode == 0, _output(proc)[-4000:]


def _start(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``command`` in a process group of its own, its output going to a file (a pipe nobody reads fills)."""
    fd, log = tempfile.mkstemp(dir=cwd, prefix="out-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env={**_env(), **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    LOGS[proc.pid] = Path(log)
    return proc


LOGS: dict[int, Path] = {}


def _output(proc: subprocess.Popen[bytes]) -> str:
    return LOGS[proc.pid].read_text(errors="replace")


def _wait(procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait for every process; past LIMIT print every rank's stacks, end them and fail."""
    import signal

    deadline = time.monotonic() + LIMIT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:  # PYTHONFAULTHANDLER: SIGABRT makes every Python process of the group print its stacks
            os.killpg(proc.pid, signal.SIGABRT)
        for proc in procs:
            proc.wait(timeout=30)
            print(_output(proc)[-8000:])
        pytest.fail(f"DDP run hung for {LIMIT} s; the stacks of its processes are printed above")


def _check_one_run(runs: Path, cifar: Path) -> None:
    """One run folder and one W&B run; its test figures are those of one process on the same checkpoint."""
    folders = [p for p in runs.iterdir() if not p.is_symlink()]
    assert len(folders) == 1 and (runs / "latest").resolve() == folders[0], folders
    assert len(list(folders[0].glob("wandb/offline-run-*"))) == 1
    ddp_test = json.loads((folders[0] / "summary.json").read_text())["test"]
    single = run(["test", *ARGS, f"--data.data_dir={cifar}", "--trainer.devices=1", "--trainer.logger=false",
                  f"--trainer.default_root_dir={runs.parent / 'single'}", f"--ckpt_path={folders[0]}"])  # fmt: skip
    assert single is not None
    figures = {k: float(v) for k, v in single.trainer.callback_metrics.items() if k.startswith("test/")}
    assert figures.keys() == ddp_test.keys() and "test/acc" in figures
    for key, value in figures.items():
        assert ddp_test[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow  # the other DDP tests are slow too: processes started, 40 s on two cores
def test_lightning_spawns_two_processes_with_the_shipped_wandb_logger(cifar: Path, tmp_path: Path) -> None:
    # The shipped config with its W&B logger hung here before: rank 0 alone made a collective call.
    assert EXE is not None
    runs = tmp_path / "runs"
    _launch([[EXE, "fit", *ARGS, "--config", "overrides/cpu_ddp", f"--data.data_dir={cifar}",
              f"--trainer.default_root_dir={runs}"]], tmp_path)  # fmt: skip
    _check_one_run(runs, cifar)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_torchrun_two_processes(cifar: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "lightning_cnn", "fit", *ARGS,
               "--trainer.devices=2", "--trainer.strategy=ddp", f"--data.data_dir={cifar}",
               f"--trainer.default_root_dir={runs}"]  # fmt: skip
    _launch([command], tmp_path)
    _check_one_run(runs, cifar)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_the_fast_recipe_whitens_its_first_layer_under_torchrun(cifar: Path, tmp_path: Path) -> None:
    # the ranks average their patch covariances (a collective call in the first batch): none may wait for another
    runs = tmp_path / "runs"
    fast = [a if a != "cifar10_base" else "cifar10_fast" for a in ARGS]
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "lightning_cnn", "fit", *fast,
               "--trainer.devices=2", "--trainer.strategy=ddp", f"--data.data_dir={cifar}",
               f"--trainer.default_root_dir={runs}", "--data.eval_batch_size=4"]  # fmt: skip
    _launch([command], tmp_path)
    logs = "".join(path.read_text() for path in tmp_path.glob("out-*.log"))
    assert logs.count("WhitenFirstConv: 54 of 64 first-layer filters") == 1  # said once, by rank 0
    (run,) = [p for p in runs.iterdir() if not p.is_symlink()]
    assert json.loads((run / "summary.json").read_text())["test"]["test/acc"] >= 0


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_nodes_on_one_machine(cifar: Path, tmp_path: Path) -> None:
    runs, port = tmp_path / "runs", free_port()
    commands = [
        [TORCHRUN, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
         f"--master_port={port}", "-m", "lightning_cnn", "fit", *ARGS, "--trainer.devices=1", "--trainer.num_nodes=2",
         "--trainer.strategy=ddp", f"--data.data_dir={cifar}", f"--trainer.default_root_dir={runs}"]
        for node in (0, 1)
    ]  # fmt: skip
    _launch(commands, tmp_path)  # type: ignore[arg-type]
    _check_one_run(runs, cifar)


def _slurm_tasks(job: str) -> list[dict[str, str]]:
    """The variables SLURM sets for two tasks on one node (as Lightning's own SLURM tests set them)."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "lightning-cnn", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    return [{**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)} for rank in (0, 1)]


@pytest.mark.slow
def test_slurm_tasks_as_srun_starts_them(cifar: Path, tmp_path: Path) -> None:
    assert EXE is not None
    runs = tmp_path / "runs"
    command = [EXE, "fit", *ARGS, "--trainer.devices=2", "--trainer.strategy=ddp", f"--data.data_dir={cifar}",
               f"--trainer.default_root_dir={runs}"]  # fmt: skip
    _launch([command, command], tmp_path, _slurm_tasks("4242"))
    _check_one_run(runs, cifar)
    (folder,) = [p.name for p in runs.iterdir() if not p.is_symlink()]
    assert folder.startswith("slurm-4242-")  # named by the job, so a requeued job finds it


@pytest.mark.slow
def test_the_watchdog_ends_a_hung_rank_with_its_stack(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import time, types
        from lightning_cnn.training.callbacks import HangWatchdog
        watchdog = HangWatchdog(timeout=1)
        watchdog.arm(types.SimpleNamespace(world_size=1))  # one process: never armed
        time.sleep(1.5)
        watchdog.arm(types.SimpleNamespace(world_size=2))
        def waiting_in_a_collective():
            time.sleep(60)
        waiting_in_a_collective()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Timeout" in done.stderr and "waiting_in_a_collective" in done.stderr


@pytest.mark.slow
def test_slurm_requeue_on_sigusr1_resumes_the_same_run(cifar: Path, tmp_path: Path) -> None:
    import signal

    import torch

    assert EXE is not None
    bin_dir = tmp_path / "bin"  # scontrol as SLURM has it, recording what it was asked
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    runs = tmp_path / "runs"
    command = [EXE, "fit", *ARGS, "--trainer.devices=2", "--trainer.strategy=ddp", f"--data.data_dir={cifar}",
               f"--trainer.default_root_dir={runs}", "--trainer.max_epochs=400", "--test_after_fit=false"]  # fmt: skip
    envs = [{**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"} for env in _slurm_tasks("777")]
    procs = [_start(command, tmp_path, env) for env in envs]
    deadline = time.monotonic() + 120
    while not list(runs.glob("*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in procs:  # `#SBATCH --signal=SIGUSR1@90`: every task gets it before the time limit
        proc.send_signal(signal.SIGUSR1)
    _wait(procs)  # every rank saves at the next step boundary, rank 0 requeues, and the job step ends
    assert [proc.returncode for proc in procs] == [143, 143], _output(procs[0])[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    (run,) = [p for p in runs.iterdir() if not p.is_symlink()]
    (hpc,) = run.glob("hpc_ckpt_*.ckpt")
    saved = torch.load(hpc, weights_only=True)
    epoch = saved["epoch"]
    # the epoch's training figures so far, summed over both ranks (4 images a batch each): rank 0 resumes them
    images = 2 * 4 * (saved["global_step"] - 3 * epoch)
    assert saved["train_epoch_metrics"]["train_loss"]["weight"].item() == images > 0
    requeued = [*command[:-2], f"--trainer.max_epochs={epoch + 2}", "--test_after_fit=false"]
    _launch([requeued, requeued], tmp_path, envs)  # the requeued job: same command, same job id
    assert [p for p in runs.iterdir() if not p.is_symlink()] == [run]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"] == epoch + 1


@pytest.mark.slow
def test_ddp_predict_writes_every_process_share_in_the_input_order(cifar: Path, tmp_path: Path) -> None:
    from PIL import Image

    assert EXE is not None
    fitted = run(["fit", *ARGS, f"--data.data_dir={cifar}", "--trainer.devices=1", "--trainer.logger=false",
                  f"--trainer.default_root_dir={tmp_path / 'runs'}", "--test_after_fit=false"])  # fmt: skip
    assert fitted is not None
    images = tmp_path / "mine"
    images.mkdir()
    for k in range(7):  # odd: the two processes get 4 and 3
        Image.new("RGB", (32, 32), (30 * k, 200 - 20 * k, 90)).save(images / f"img{k}.png")
    predict = [EXE, "predict", *ARGS, f"--data.data_dir={cifar}", f"--data.predict_dir={images}",
               f"--ckpt_path={tmp_path / 'runs/latest'}", "--trainer.logger=false"]  # fmt: skip
    _launch([[*predict, "--trainer.devices=1", f"--predictions.output={tmp_path / 'one.csv'}"]], tmp_path)
    _launch([[*predict, "--config", "overrides/cpu_ddp", f"--predictions.output={tmp_path / 'ddp.csv'}"]], tmp_path)
    one, ddp = (tmp_path / "one.csv").read_text(), (tmp_path / "ddp.csv").read_text()
    assert [line.split(",")[0].rsplit("/", 1)[-1] for line in ddp.splitlines()[1:]] == [f"img{k}.png" for k in range(7)]
    assert ddp == one  # the same rows as one process writes


@pytest.mark.slow
def test_an_unreachable_wandb_server_under_ddp_records_one_offline_run(cifar: Path, tmp_path: Path) -> None:
    # Rank 0 waits for the server and falls back to offline while rank 1 waits for it: no hang, one run.
    assert EXE is not None
    runs = tmp_path / "runs"
    server = {"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "WANDB_INIT_TIMEOUT": "3",
              "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_MODE": "online"}  # fmt: skip
    command = [EXE, "fit", *ARGS, "--config", "overrides/cpu_ddp", f"--data.data_dir={cifar}",
               f"--trainer.default_root_dir={runs}", "--test_after_fit=false"]  # fmt: skip
    proc = _start(command, tmp_path, server)
    _wait([proc])
    assert proc.returncode == 0, _output(proc)[-4000:]
    assert "the server could not be reached" in _output(proc)
    (run_folder,) = [p for p in runs.iterdir() if not p.is_symlink()]
    assert len(list(run_folder.glob("wandb/offline-run-*"))) == 1
