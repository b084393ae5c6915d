"""Resume, determinism, divergence and interruption: a run survives faults and never loses good checkpoints."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from fakedata import make_image_folder, make_mnist_idx, mounted_tmpfs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnn.cli import run
from lightning_cnn.experiments import CONFIG_DIR
from lightning_cnn.models import MNISTCNN, ImageClassifier
from lightning_cnn.reporting.report import RunReport
from lightning_cnn.training.callbacks import InterruptCheckpoint, StopOnNonFiniteLoss, TrainingDiverged

CONFIGS = CONFIG_DIR  # the shipped configs, wherever the package is installed


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "cifar10", per_class_train=8, per_class_test=2)


def _fit(root: Path, out: Path, epochs: int, *extra: str, config: str = "cifar10_dropout") -> Any:
    """A short fit of a shipped config whose runs go to ``out/<run id>`` (``out/latest`` once it finished)."""
    return run([
        "fit", "--config", str(CONFIGS / f"{config}.yaml"), f"--data.data_dir={root}", "--data.batch_size=16",
        f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=3", "--trainer.check_val_every_n_epoch=1",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}", "--test_after_fit=false", *extra,
    ])  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():  # an experiment folder of _fit: its latest run's last checkpoint
        path = path / "latest" / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)["state_dict"]


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(cifar_root: Path, tmp_path: Path) -> None:
    straight = _fit(cifar_root, tmp_path / "a", 3)
    _fit(cifar_root, tmp_path / "b", 2)
    resumed = _fit(cifar_root, tmp_path / "b", 3, "--ckpt_path=last")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("val/acc", "val/loss", "train/loss_epoch"):
        assert torch.equal(straight.trainer.callback_metrics[key], resumed.trainer.callback_metrics[key]), key


@pytest.mark.parametrize(
    "config",
    # cifar10_fast too: its one-cycle schedule builds the training loader before the checkpoint is read (Lightning
    # #20550), its whitening callback must not act again, and its AdamW step is fused
    ["cifar10_dropout", "cifar10_fast"],
)
def test_a_run_interrupted_mid_epoch_resumes_bit_for_bit(cifar_root: Path, tmp_path: Path, config: str) -> None:
    # 3 batches an epoch: SIGTERM after step 4 lands in the middle of epoch 1, with dropout and augmentation
    straight = _fit(cifar_root, tmp_path / "a", 3, config=config)
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        _fit(cifar_root, tmp_path / "b", 3, "--trainer.callbacks+=fakedata.SigtermAtStep", config=config)
    (interrupted,) = tmp_path.glob("b/*/checkpoints/last-interrupted.ckpt")
    assert torch.load(interrupted, weights_only=True)["global_step"] == 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable")  # Lightning's mid-epoch warning
        resumed = _fit(cifar_root, tmp_path / "b", 3, "--ckpt_path=last", config=config)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("val/acc", "train/loss_epoch", "train/acc"):
        assert torch.equal(straight.trainer.callback_metrics[key], resumed.trainer.callback_metrics[key]), key
    # the interrupted epoch's training figures too: its first batches were trained before the interruption
    assert _history(tmp_path / "a") == _history(tmp_path / "b")


def _history(experiment: Path) -> list[dict[str, str]]:
    with open(experiment / "latest" / "history.csv") as f:
        return [{k: v for k, v in row.items() if k.startswith(("train/", "val/"))} for row in csv.DictReader(f)]


def test_same_seed_same_weights_and_metrics(cifar_root: Path, tmp_path: Path) -> None:
    one, two = _fit(cifar_root, tmp_path / "a", 2), _fit(cifar_root, tmp_path / "b", 2)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert one.trainer.callback_metrics.keys() == two.trainer.callback_metrics.keys()
    assert all(torch.equal(v, two.trainer.callback_metrics[k]) for k, v in one.trainer.callback_metrics.items())
    other = _fit(cifar_root, tmp_path / "c", 2, "--seed_everything=1")
    assert not torch.equal(
        one.trainer.callback_metrics["train/loss_epoch"], other.trainer.callback_metrics["train/loss_epoch"]
    )


class _BreaksAt(nn.Module):
    """MNISTCNN that outputs NaN from its ``at``-th call on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.net, self.calls, self.at = MNISTCNN(), 0, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1 if self.training else 0
        out = self.net(x)
        return out * float("nan") if self.calls >= self.at else out


def _data() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))), batch_size=4)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_good_checkpoints(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(tmp_path, filename="best", monitor="val/acc", mode="max", save_last=True,
                                 save_on_train_epoch_end=True)  # fmt: skip
    model = ImageClassifier(_BreaksAt(at=5), num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        callbacks=[checkpoint, StopOnNonFiniteLoss(), InterruptCheckpoint()])  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"became nan at epoch 1, step 4 \(batch 1\)"):
        trainer.fit(model, _data(), _data())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "last.ckpt").values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


class _SigtermAt(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)


def _resumable_trainer(folder: Path, *extra: L.Callback) -> L.Trainer:
    """3 epochs, checkpoints in ``folder`` at every epoch end and on an interruption."""
    checkpoint = ModelCheckpoint(folder, save_last=True, save_on_train_epoch_end=True)
    return L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, default_root_dir=folder / "run",
                     callbacks=[checkpoint, InterruptCheckpoint(), *extra])  # fmt: skip


def test_sigterm_leaves_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        _resumable_trainer(tmp_path, _SigtermAt()).fit(ImageClassifier(MNISTCNN(), num_classes=10), _data())
    interrupted = torch.load(tmp_path / "last-interrupted.ckpt", weights_only=True)
    assert interrupted["global_step"] == 4  # the step in flight finished, then the run stopped
    resumed = _resumable_trainer(tmp_path)
    resumed.fit(ImageClassifier(MNISTCNN(), num_classes=10), _data(), ckpt_path="last")
    assert resumed.global_step == 9 and resumed.current_epoch == 3


def test_a_run_resumed_mid_epoch_reports_every_epoch_and_all_its_training(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # interrupted at step 4, the first batch of epoch 1
        _resumable_trainer(tmp_path, RunReport(), _SigtermAt()).fit(
            ImageClassifier(MNISTCNN(), num_classes=10), _data()
        )
    _resumable_trainer(tmp_path, RunReport()).fit(
        ImageClassifier(MNISTCNN(), num_classes=10), _data(), ckpt_path="last"
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["train_images"] == 3 * 12  # 4 steps before, 5 after, 4 images each
    # before the fix the resumed part timed its first epoch from the clock's zero (hours)
    assert 0 < summary["train_seconds"] <= summary["fit_seconds"]
    with open(tmp_path / "run" / "history.csv") as f:
        assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [0, 1, 2]


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_leaves_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from lightning_cnn.checkpoints import AtomicCheckpointIO
    from lightning_cnn.files import WriteError

    io, path = AtomicCheckpointIO(), tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()

    def disk_full(fd: int) -> None:  # the data did not all reach the disk (a real full disk: the next test)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_cnn.files.os.fsync", disk_full)
    with pytest.raises(WriteError, match=r"Could not write .*last\.ckpt: the disk is full\. The previous"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_a_full_disk_mid_run_ends_in_one_line_and_resume_takes_the_last_good_checkpoint(
    cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import errno

    import lightning_cnn.files as files

    saves, real_fsync = [], files.os.fsync

    def fills_up(fd: int) -> None:
        name = Path(f"/proc/self/fd/{fd}").resolve().name  # the file being written: checkpoints only
        if name.endswith(".partial") and ".ckpt." in name:
            saves.append(1)
            if len(saves) > 2:  # epoch 0's best and last went through; the disk is full from epoch 1 on
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fills_up)
    with pytest.raises(SystemExit) as exit_info:
        _fit(cifar_root, tmp_path, 3)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Traceback" not in err
    assert re.search(r"Could not write \S+/checkpoints/(best|last)\.ckpt", err) and "last-interrupted" not in err
    monkeypatch.undo()
    (run_folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    last = torch.load(run_folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0  # the good one, intact
    assert not list(run_folder.rglob("*.partial"))
    resumed = _fit(cifar_root, tmp_path, 2, "--ckpt_path=last")
    assert resumed.trainer.current_epoch == 2


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_runs_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """A team shares run folders: checkpoints, summary and history are as readable as any file the user makes."""
    from lightning_cnn.files import write_atomically

    old = os.umask(umask)
    try:
        write_atomically(tmp_path / "summary.json", "{}")
        (tmp_path / "plain.txt").write_text("")  # what open() makes under this umask
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_a_run_that_diverges_in_its_first_epoch_says_nothing_was_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The message must not name a run folder as keeping checkpoints when the run kept none (and was removed)."""
    (tmp_path / "nan.yaml").write_text("model:\n  optimizer:\n    class_path: torch.optim.SGD\n    init_args:\n"
                                       "      lr: 1.0e+30\n")  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(CONFIGS / "mnist.yaml"), "--config", str(tmp_path / "nan.yaml"),
             f"--data.data_dir={make_mnist_idx(tmp_path / 'data', n_train=64, n_test=32)}",
             f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.logger=false", "--data.batch_size=16",
             "--trainer.enable_progress_bar=false"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "no epoch had finished, so no checkpoint was kept" in err
    assert not [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # and no run folder is left


@pytest.mark.parametrize("hook", ["on_train_end", "on_test_start", "on_test_end"])
def test_a_sigterm_between_or_at_the_end_of_phases_stops_the_run_unfinished(
    cifar_root: Path, tmp_path: Path, hook: str
) -> None:
    """After the last training batch, before the test, in the test's last batch: Lightning logged it and went on."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with pytest.raises(SIGTERMException):
        _fit(cifar_root, tmp_path, 1, "--test_after_fit=true", "--trainer.callbacks+=fakedata.SigtermAt",
             f"--trainer.callbacks.hook={hook}")  # fmt: skip
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not (tmp_path / "latest").exists()  # not a finished run: a resume tests it
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    resumed = _fit(cifar_root, tmp_path, 1, "--test_after_fit=true", "--ckpt_path=last")
    assert "test/acc" in resumed.trainer.callback_metrics and (tmp_path / "latest").resolve() == folder


def test_a_really_full_disk_keeps_the_previous_checkpoint_and_names_the_file(tmp_path: Path) -> None:
    """On a real full filesystem (a 1 MiB tmpfs), not a stand-in for torch.save: one error, no partial file."""
    from lightning_cnn.checkpoints import AtomicCheckpointIO
    from lightning_cnn.files import WriteError

    with mounted_tmpfs(tmp_path / "disk", "size=1m") as disk:
        io, path = AtomicCheckpointIO(), disk / "checkpoints" / "best.ckpt"
        io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, path)
        with pytest.raises(WriteError, match=r"Could not write .*best\.ckpt: the disk is full\."):
            io.save_checkpoint({"state_dict": {"w": torch.ones(500_000)}, "epoch": 2}, path)  # 2 MB
        assert torch.load(path, weights_only=True)["epoch"] == 1
        assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]  # no .partial keeps the disk full


def test_a_sigterm_during_validation_resumes_to_validate_that_epoch(cifar_root: Path, tmp_path: Path) -> None:
    """Interrupted in epoch 1's validation, the resumed run validated epoch 1 never: no history row, no best."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with pytest.raises(SIGTERMException):
        _fit(cifar_root, tmp_path, 3, "--trainer.callbacks+=fakedata.SigtermAt",
             "--trainer.callbacks.hook=on_validation_batch_end", "--trainer.callbacks.epoch=1")  # fmt: skip
    _fit(cifar_root, tmp_path, 3, "--ckpt_path=last")
    with open(tmp_path / "latest" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in rows if r.get("val/acc")] == [0, 1, 2]
    straight = _fit(cifar_root, tmp_path / "straight", 3)  # and the weights are those of an uninterrupted run
    a, b = _weights(tmp_path), _weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a) and straight is not None
