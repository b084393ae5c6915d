"""The benchmarks' shared fit helper still runs the CLI as the benchmarks expect (on fake data)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fakedata import make_mnist_idx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fit_rate import fit_summary, steady_images_per_second


@pytest.mark.slow
def test_fit_rate_reports_training_images_per_second(tmp_path: Path) -> None:
    make_mnist_idx(tmp_path, n_train=256, n_test=32)
    summary = fit_summary("mnist", str(tmp_path), 2, "--data.batch_size=64", wandb=True)
    assert summary["train_images"] == 2 * 64  # two batches, nothing else counted
    # images over training seconds (the summary rounds seconds to 0.01 s, so compare seconds)
    assert 128 / summary["train_images_per_second"] == pytest.approx(summary["train_seconds"], abs=0.006)
    steady = steady_images_per_second(summary)  # the second batch alone
    assert steady == pytest.approx(64 / max(summary["train_seconds"] - summary["first_step_seconds"], 1e-9))


def test_with_steal_reports_the_share_of_cpu_time_taken_meanwhile(tmp_path: Path) -> None:
    from cpu_steal import with_steal

    stat = tmp_path / "stat"
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 20 800 0 0 0 80 0 0\ncpu0 50 0 10 400 0 0 0 40 0 0\n")

    def busy() -> str:  # 300 more jiffies, 90 of them stolen
        stat.write_text("cpu  250 0 30 850 0 0 0 170 0 0\ncpu0 125 0 15 425 0 0 0 85 0 0\n")
        return "done"

    assert with_steal(busy, stat) == ("done", 90 / 300)


def test_with_steal_is_unknown_without_proc_stat(tmp_path: Path) -> None:
    from cpu_steal import with_steal

    assert with_steal(lambda: 1, tmp_path / "missing") == (1, None)


def test_time_target_reads_the_epochs_of_the_recipe_each_precision_trains(tmp_path: Path) -> None:
    from train_throughput import fast_epochs

    config = tmp_path / "recipe.yaml"
    config.write_text(
        "by_precision:\n  bf16-mixed:\n    trainer.max_epochs: 18\n  16-mixed: {data.init_args.batch_size: 256}\n"
        "trainer:\n  max_epochs: 14\n"
    )
    assert fast_epochs("bf16-mixed", config) == 18
    assert fast_epochs("16-mixed", config) == 14  # its recipe changes the batch, not the epochs
    assert fast_epochs("32-true", config) == 14
    assert fast_epochs("bf16", config) == 18  # Lightning's alias, as the CLI reads it
    assert fast_epochs("32-true") >= 1  # the shipped fast config


def test_step_phases_splits_every_step_of_the_bare_loop_and_of_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from fakedata import QUICK, make_image_folder
    from step_phases import OUT_ENV, PHASES, WARM_UP, medians, phase_seconds
    from train_throughput import bare_steps

    from lightning_cnn.cli import run

    data = make_image_folder(tmp_path / "cifar10", per_class_train=3, per_class_test=1)  # 30 images
    steps = list(bare_steps(str(tmp_path), 5, batch=8))  # past an epoch's end (3 full batches of 8, then 6)
    assert [size for size, _ in steps] == [8, 8, 8, 6, 8]
    assert all(len(marks) == 5 and marks == sorted(marks) for _, marks in steps)
    rows = [phase_seconds(marks) for _, marks in steps]
    assert len(medians(rows)) == len(PHASES) and all(ms >= 0 for ms in medians(rows))
    monkeypatch.chdir(tmp_path)  # fit as the benchmark runs it, with its phase timer
    monkeypatch.setenv(OUT_ENV, str(tmp_path / "phases.json"))
    run(["fit", "--config", "cifar10_base", f"--data.data_dir={data}", *QUICK, "--trainer.logger=false",
         "--trainer.limit_train_batches=3", "--data.batch_size=8",
         "--trainer.callbacks+=step_phases.PhaseTimer"])  # fmt: skip
    timed = json.loads((tmp_path / "phases.json").read_text())
    assert len(timed) == len(PHASES) and all(ms >= 0 for ms in timed) and WARM_UP > 3  # fewer steps: all kept


@pytest.mark.slow
def test_the_recipe_ablation_trains_each_variant_once_and_evaluates_as_the_run_tested(tmp_path: Path) -> None:
    from fakedata import make_image_folder
    from recipe_ablation import evaluate, train

    data = tmp_path / "data"
    make_image_folder(data / "cifar10", per_class_train=4, per_class_test=2)
    small = {"data.init_args.batch_size": 8, "data.init_args.eval_batch_size": 8}
    first = train(tmp_path / "out", "pad2", 1, 0, str(data), **small)
    again = train(tmp_path / "out", "pad2", 1, 0, str(data), **small)  # finished: read, not trained again
    assert first.folder == again.folder and first.summary == again.summary
    assert first.folder is not None and "pad: 2" in (first.folder / "config.yaml").read_text()  # its override
    figures = evaluate(first, str(data))
    # the shipped recipe tests with the mirror and one-pixel shifts: the ablation's evaluation of them is the run's
    assert figures["flip+shift1"] == pytest.approx(first.test("test/acc"))
    assert set(figures) == {"plain", "flip", "flip+shift1", "flip+shift2"}


@pytest.mark.slow
def test_the_storage_stress_counts_every_trial_of_parallel_workers(capsys: pytest.CaptureFixture[str]) -> None:
    from tune_storage import run

    run(workers=2, trials=3)
    out = capsys.readouterr().out
    assert "2 worker(s): 6 trials" in out and "0 errors" in out and "every trial once" in out, out
