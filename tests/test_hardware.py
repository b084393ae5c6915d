"""The precision and compile choice is made per machine, in code; tested with faked capabilities both ways."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fakedata import QUICK as QUICK_FIT
from fakedata import make_image_folder, make_mnist_idx

from lightning_cnn.cli import run
from lightning_cnn.cores import usable_cores
from lightning_cnn.training import hardware

QUICK = [*QUICK_FIT, "--trainer.logger=false"]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert {"avx512f", "avx512_bf16"} <= hardware.cpu_flags(cpuinfo)
    assert hardware.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx512f", "avx512_bf16"}, "bf16-mixed"), ({"amx_bf16"}, "bf16-mixed"), ({"avx512f", "avx2"}, "32-true")],
)
def test_cpu_precision_follows_the_bf16_instructions(flags: set[str], expected: str) -> None:
    for accelerator in ("cpu", None):
        choice = hardware.choose_precision(accelerator, cuda=False, flags=frozenset(flags))
        assert choice is not None and choice.precision == expected and choice.reason


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_gpu_precision_follows_the_cards_bf16_support(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    choice = hardware.choose_precision("auto", cuda=True, flags=frozenset())
    assert choice is not None and choice.precision == expected
    assert hardware.compile_pays("auto", cuda=True) and not hardware.compile_pays("cpu", cuda=True)
    assert not hardware.compile_pays("auto", cuda=False)


def test_the_cli_picks_the_precision_unless_told_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # the faked CPU lacks bf16 (the other way round is chosen by the same function, tested above)
    flags, expected = {"avx512f"}, "32-true"
    monkeypatch.setattr(hardware, "cpu_flags", lambda *a: frozenset(flags))
    monkeypatch.chdir(tmp_path)
    data = make_mnist_idx(tmp_path / "data", n_train=64, n_test=32)
    cli = run(["fit", "--config", "mnist", f"--data.data_dir={data}", "--trainer.accelerator=cpu", *QUICK])
    assert cli is not None and cli.trainer.precision == expected and not cli.model.compile_network
    assert f"Precision: {expected}" in capsys.readouterr().out
    summary = (tmp_path / "runs/mnist/latest/summary.json").read_text()
    assert f'"precision": "{expected}"' in summary
    told = run(["fit", "--config", "mnist", f"--data.data_dir={data}", "--trainer.accelerator=cpu", *QUICK,
                "--trainer.precision=bf16-mixed"])  # fmt: skip
    assert told is not None and told.trainer.precision == "bf16-mixed"
    assert "Precision:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "args", "batch"),
    [
        ({"avx512f"}, [], 64),  # fp32: the config's own batch
        ({"avx512_bf16"}, [], 128),  # bf16: the batch that goes with it (by_precision)
        ({"avx512_bf16"}, ["--data.batch_size=32"], 32),  # the command line wins
        ({"avx512_bf16"}, ["--trainer.precision=32-true"], 64),  # and so does a precision given there
        ({"avx512f"}, ["--trainer.precision=bf16"], 128),  # Lightning's alias for bf16-mixed gets its recipe
        ({"avx512_bf16"}, ["--trainer.precision=32"], 64),  # and 32 the fp32 one
    ],
)
def test_a_recipe_takes_the_batch_size_of_the_precision_the_machine_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: set[str], args: list[str], batch: int
) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda *a: frozenset(flags))
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "cifar10", per_class_train=4, per_class_test=1)
    recipe = tmp_path / "recipe.yaml"  # the shipped fast recipe, with a batch that differs by precision
    recipe.write_text("by_precision:\n  bf16-mixed: {data.init_args.batch_size: 128, trainer.max_epochs: 5}\n"
                      "data:\n  init_args:\n    batch_size: 64\n")  # fmt: skip
    cli = run(["fit", "--config", "cifar10_fast", "--config", str(recipe), f"--data.data_dir={data}",
               "--trainer.accelerator=cpu", *QUICK, "--data.eval_batch_size=10", *args])  # fmt: skip
    assert cli is not None and cli.datamodule.batch_size == batch
    assert cli.trainer.max_epochs == 1  # QUICK's --trainer.max_epochs=1 wins over the recipe's epochs
    saved = (tmp_path / "runs/cifar10_fast/latest/config.yaml").read_text()
    assert f"batch_size: {batch}\n" in saved  # the run's config records what it trained with


def test_a_recipe_for_a_precision_lightning_does_not_know_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # a misspelt precision would otherwise never match and its recipe never apply
    (tmp_path / "typo.yaml").write_text("by_precision:\n  bf16_mixed:\n    trainer.max_epochs: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "cifar10_fast", "--config", "typo.yaml", *QUICK])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "by_precision.bf16_mixed: 'bf16_mixed' is no precision Lightning trains in" in err
    assert len(err.strip().splitlines()) == 1


def test_a_recipe_naming_a_setting_the_config_lacks_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda *a: frozenset({"avx512_bf16"}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("by_precision:\n  bf16-mixed:\n    data.init_args.no_such_setting: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "cifar10_fast", "--config", "bad.yaml", *QUICK])
    assert exit_info.value.code == 2
    assert "no_such_setting is not a setting of this config" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_a_true_precision_trains_tests_and_predicts_the_augmented_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    # Lightning casts a batch for these before the DataModule turns its uint8 images into floats (and refused
    # the augmentation's frozen dataclass): 64-true crashed in the first convolution, bf16-true likewise
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "cifar10", per_class_train=4, per_class_test=1)
    args = ["--config", "cifar10_fast", f"--data.data_dir={data}", *QUICK, "--data.eval_batch_size=10",
            f"--trainer.precision={precision}"]  # fmt: skip
    cli = run(["fit", *args])
    assert cli is not None and next(cli.model.parameters()).dtype == {"64-true": torch.float64}.get(
        precision, torch.bfloat16
    )
    summary = json.loads((tmp_path / "runs/cifar10_fast/latest/summary.json").read_text())
    assert summary["precision"] == precision and 0 <= summary["test"]["test/acc"] <= 1
    predicted = run(["predict", *args, f"--data.predict_dir={data}/test/cat",
                     "--ckpt_path=runs/cifar10_fast/latest/checkpoints/last.ckpt"])  # fmt: skip
    assert predicted is not None and (tmp_path / "predictions.csv").read_text().count("\n") == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_thread_and_worker_counts_follow_the_cores_a_scheduler_left_to_the_process(tmp_path: Path) -> None:
    """``taskset``, a SLURM job's cpuset: serve's workers, tune's threads, the decode pool and an image folder's
    loader workers count these, not the machine's cores."""
    from lightning_cnn.data import ImageFolderDataModule

    folder = make_image_folder(tmp_path / "images", per_class_train=1, per_class_test=1)
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cores() == 1
        assert ImageFolderDataModule(str(folder), image_size=8).num_workers == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cores() == len(allowed)
