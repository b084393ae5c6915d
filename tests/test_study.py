"""`lightning-cnn study`: the figures on a study whose right numbers are known, continuation, and a real run."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from fakedata import QUICK, make_image_folder

from lightning_cnn.cli import main
from lightning_cnn.reporting.record import RunRecord
from lightning_cnn.reporting.study_report import aggregate, split_figures, time_to_reach
from lightning_cnn.study import run_study


def _run(test: dict[str, float], curve: list[float], seconds_per_epoch: float = 10.0, **summary: float) -> RunRecord:
    history = [
        {"epoch": float(e), "val/acc": acc, "train_seconds": seconds_per_epoch * (e + 1)} for e, acc in enumerate(curve)
    ]
    return RunRecord(None, {"test": test, "trainable_parameters": 100, "train_seconds": 50.0, **summary}, history)


def test_accuracy_matrix_forgetting_and_forward_transfer_of_a_known_study() -> None:
    phase1 = _run({"test/acc": 0.80}, [0.5, 0.8])
    phase2 = {
        "transfer": _run({"test/acc": 0.70, "test/phase1_acc_before": 0.79, "test/phase1_acc": 0.79,
                          "test/all_classes_acc": 0.40}, [0.65, 0.70]),
        "finetune": _run({"test/acc": 0.90, "test/phase1_acc_before": 0.79, "test/phase1_acc": 0.59,
                          "test/all_classes_acc": 0.45}, [0.80, 0.86, 0.90]),
        "scratch": _run({"test/acc": 0.85, "test/all_classes_acc": 0.43}, [0.60, 0.75, 0.85]),
    }  # fmt: skip
    figures = split_figures(phase1, phase2)
    transfer, finetune, scratch = figures["transfer"], figures["finetune"], figures["scratch"]
    assert transfer["forgetting"] == 0.0 and transfer["accuracy_matrix"] == [[0.80, None], [0.80, 0.70]]
    assert finetune["forgetting"] == pytest.approx(0.20)
    assert finetune["accuracy_matrix"][1][0] == pytest.approx(0.60)  # R11 minus what phase 2 took away
    assert scratch["forgetting"] == 0.0 and scratch["accuracy_matrix"][1] == [0.80, 0.85]
    assert transfer["forward_transfer"] == pytest.approx(-0.15) and finetune["forward_transfer"] == pytest.approx(0.05)
    assert finetune["task_incremental_acc"] == pytest.approx(0.75)
    assert finetune["class_incremental_acc"] == 0.45
    # scratch ends at 0.85 validation accuracy: fine-tuning reaches it in 2 epochs (20 s), transfer never does
    assert (finetune["epochs_to_scratch_final"], finetune["seconds_to_scratch_final"]) == (2, 20.0)
    assert transfer["epochs_to_scratch_final"] is None and scratch["epochs_to_scratch_final"] == 3


def test_mean_and_sample_std_over_seeds_keep_the_values() -> None:
    summary = aggregate([{"acc": 0.8, "m": [[0.5, None]]}, {"acc": 0.9, "m": [[0.7, None]]}])
    assert summary["acc"]["mean"] == pytest.approx(0.85) and summary["acc"]["std"] == pytest.approx(0.0707107)
    assert summary["acc"]["values"] == [0.8, 0.9]
    assert summary["m"][0][0]["mean"] == pytest.approx(0.6) and summary["m"][0][1]["mean"] is None


def test_time_to_reach_counts_epochs_and_seconds_of_the_first_epoch_at_the_target() -> None:
    history = _run({}, [0.3, 0.6, 0.55, 0.7], seconds_per_epoch=4.0)
    assert time_to_reach(history, 0.6) == (2, 8.0)
    assert time_to_reach(history, 0.9) == (None, None)


def _fake_fit(calls: list[dict[str, Any]], stop_at: int | None = None):
    """Stands in for ``launch.fit``: writes what a finished run leaves, or 'dies' with a checkpoint."""

    def fit(config: str, overrides: Mapping[str, Any], args: Sequence[str], group: str) -> RunRecord:
        calls.append({"config": config, "overrides": dict(overrides), "args": list(args), "group": group})
        root = Path(overrides["trainer.default_root_dir"])
        folder = Path(overrides["ckpt_path"]) if "ckpt_path" in overrides else root / overrides["run_id"]
        if stop_at is not None and len(calls) == stop_at:
            (folder / "checkpoints").mkdir(parents=True)
            (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
            raise KeyboardInterrupt  # the study is stopped in this run
        folder.mkdir(parents=True, exist_ok=True)
        test = {"test/acc": 0.9 + overrides["seed_everything"] / 100, "test/phase1_acc_before": 0.8,
                "test/phase1_acc": 0.8}  # fmt: skip
        history = [{"epoch": 0.0, "val/acc": 0.5, "train_seconds": 5.0}, {"epoch": 1.0, "val/acc": 0.9,
                                                                          "train_seconds": 10.0}]  # fmt: skip
        record = RunRecord(folder, {"run": folder.name, "test": test, "train_seconds": 10.0, "epochs": 2}, history)
        record.write()
        return record

    return fit


def test_an_interrupted_study_continues_where_it_stopped(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    with pytest.raises(KeyboardInterrupt):
        run_study("split_cifar10", [0, 1], ["--data.data_dir=x"], tmp_path, fit=_fake_fit(calls, stop_at=6))
    assert len(calls) == 6  # phase 1 and the three phase-2 runs of seed 0, phase 1 of seed 1, then the stop
    (study,) = [p for p in (tmp_path / "split_cifar10").iterdir()]
    assert not (study / "study.json").exists()
    calls.clear()
    again = run_study("split_cifar10", [0, 1], ["--data.data_dir=x"], tmp_path, fit=_fake_fit(calls))
    assert again == study  # the same study, continued
    assert len(calls) == 3  # the interrupted run resumed from its checkpoint, then the two left
    assert calls[0]["overrides"]["ckpt_path"].endswith("-s1-transfer")
    assert all("--data.data_dir=x" in c["args"] for c in calls)
    transfer = next(c for c in calls if c["overrides"].get("ckpt_path", "").endswith("-s1-transfer"))
    phase1_best = f"{study}/runs/split_cifar10_phase1/{study.name}-s1-phase1/checkpoints/best.ckpt"
    assert transfer["overrides"]["model.network.init_args.checkpoint_path"] == phase1_best  # its own seed's phase 1
    assert all(c["group"] == f"split_cifar10-{study.name}" for c in calls)
    result = json.loads((study / "study.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["per_seed"]) == {"0", "1"}
    assert (study / "study.md").is_file() and (study / "study.png").stat().st_size > 0
    # a finished study is not continued: the same command starts a new one
    calls.clear()
    other = run_study("split_cifar10", [0], [], tmp_path, fit=_fake_fit(calls))
    assert other != study and len(calls) == 4


def test_a_config_study_reports_test_figures_over_seeds(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    study = run_study("mnist", [0, 1, 2], [], tmp_path, fit=_fake_fit(calls))
    assert [c["config"] for c in calls] == ["mnist"] * 3
    result = json.loads((study / "study.json").read_text())
    acc = result["mean_std"]["test"]["test/acc"]
    assert acc["values"] == pytest.approx([0.90, 0.91, 0.92]) and acc["mean"] == pytest.approx(0.91)
    assert "| test/acc (%) | 91.00 ± 1.00 | 90.00, 91.00, 92.00 |" in (study / "study.md").read_text()


def test_study_refuses_bad_input_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for args, message in ((["no_such_config"], "no shipped experiment"), (["mnist", "--seeds", "0"], "--seeds")):
        with pytest.raises(SystemExit) as exit_info:
            main(["study", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "studies").exists()


def test_a_split_study_through_the_cli_on_fake_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole protocol for real on tiny data: a frozen backbone forgets exactly nothing."""
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "cifar10", per_class_train=6, per_class_test=2)
    main(["study", "split_cifar10", "--seeds", "1", f"--data.data_dir={root}", *QUICK, "--data.batch_size=10"])
    (study,) = (tmp_path / "studies/split_cifar10").glob("2*")
    result = json.loads((study / "study.json").read_text())
    transfer, finetune = result["per_seed"]["0"]["transfer"], result["per_seed"]["0"]["finetune"]
    assert transfer["forgetting"] == 0.0  # exactly: before and after computed alike, same backbone bits
    assert transfer["trainable_parameters"] < finetune["trainable_parameters"]
    assert finetune["class_incremental_acc"] is not None
    runs = sorted(p.name for p in (study / "runs").glob("*/2*"))
    assert [r.split("-s0-")[1] for r in runs] == ["finetune", "phase1", "scratch", "transfer"]
    assert (study / "study.png").is_file()
    assert (tmp_path / "studies/split_cifar10/latest").resolve() == study.resolve()


def test_link_declares_each_phase2_run_a_user_of_its_phase1_artifact(tmp_path: Path, monkeypatch) -> None:
    """After `wandb sync` of an offline study, W&B's public API makes the lineage W&B refused offline."""
    import wandb

    calls: list[tuple[str, str]] = []

    class Run:
        def __init__(self, path: str) -> None:
            self.path = path

        def use_artifact(self, artifact: str) -> None:
            calls.append((self.path, artifact))

    class Api:
        default_entity = "me"

        def artifact(self, name: str, type: str) -> str:
            assert type == "model"
            return name

        def run(self, path: str) -> Run:
            return Run(path)

    monkeypatch.setattr(wandb, "Api", Api)
    study = run_study("split_cifar10", [0], [], tmp_path, fit=_fake_fit([]))
    main(["study", "--link", str(study)])
    phase1 = f"{study.name}-s0-phase1"
    assert sorted(calls) == [
        (f"me/lightning-cnn/{study.name}-s0-{method}", f"me/lightning-cnn/model-{phase1}:best")
        for method in ("finetune", "transfer")
    ]


def test_a_sigterm_stops_a_study_and_the_same_command_continues_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A study went on training all its remaining seeds after a SIGTERM between a run's phases, and exited 0."""
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "cifar10", per_class_train=4, per_class_test=1)
    command = ["study", "cifar10_fast", "--seeds", "2", f"--data.data_dir={root}", *QUICK, "--data.batch_size=10",
               "--data.eval_batch_size=10", "--trainer.logger=false", "--trainer.callbacks+=fakedata.SigtermAt",
               "--trainer.callbacks.hook=on_train_end"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 143
    assert "resume with the same command (it continues the study)" in capsys.readouterr().err
    assert len(list((tmp_path / "studies/cifar10_fast").glob("2*/runs/cifar10_fast/2*"))) == 1  # seed 1 never ran
    monkeypatch.setenv("SEND_SIGTERM", "0")
    main(command)  # the same command, no signal this time: continues and finishes
    (study,) = (tmp_path / "studies/cifar10_fast").glob("2*")
    assert json.loads((study / "study.json").read_text())["seeds"] == [0, 1]
