"""Does the embedded SQLite storage of ``lightning-cnn tune`` hold up under parallel workers?

K worker processes share one search in a new SQLite file, opened as ``tune`` opens it (``tune.storage_for``,
heartbeats on, the shipped sweep file's space, sampler and pruner). Each trial is an instant stand-in for a
training: it reports a value for each of 12 epochs (asking the pruner each time, as the trial callback does)
and returns one, so the storage takes the writes of many trainings per second, far more than real trials of
minutes make. Printed per K: trials per second, errors raised in the workers, and what the storage holds in the
end (every trial finished once: complete + pruned = asked, none running or failed, numbers unique).

    python benchmarks/tune_storage.py [--workers 1 2 4 8] [--trials 60]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna

from lightning_cnn import tune
from lightning_cnn.experiments import CONFIG_DIR

SPACE = CONFIG_DIR / "sweeps" / "cifar10_dropout.yaml"
EPOCHS = 12


def worker(folder: str, trials: int, seed: int) -> tuple[int, float]:
    """Run ``trials`` stand-in trials: the number of errors raised, and the seconds they took."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = tune.read_space(SPACE)
    study = tune.open_study(tune.storage_for(None, Path(folder)), "stress", space, seed)
    rng = random.Random(seed)

    def objective(trial: optuna.Trial) -> float:
        space.suggest(trial)
        value = 0.0
        for epoch in range(EPOCHS):
            value = min(1.0, value + rng.random() / EPOCHS)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    errors, start = 0, time.perf_counter()
    for _ in range(trials):
        try:
            study.optimize(objective, n_trials=1)
        except Exception as err:  # what a worker would die of: "database is locked" and the like
            errors += 1
            print(f"  worker {seed}: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)
    return errors, time.perf_counter() - start


def run(workers: int, trials: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        tune.open_study(tune.storage_for(None, Path(folder)), "stress", tune.read_space(SPACE), 0)  # as tune does
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            done = pool.starmap(worker, [(folder, trials, seed) for seed in range(1, workers + 1)])
        errors, seconds = sum(e for e, _ in done), max(s for _, s in done)  # from each worker's first trial
        study = optuna.load_study(study_name="stress", storage=tune.storage_for(None, Path(folder)))
        states = Counter(t.state.name for t in study.trials)
        numbers = [t.number for t in study.trials]
        asked, reports = workers * trials, sum(len(t.intermediate_values) for t in study.trials)
        whole = states["COMPLETE"] + states["PRUNED"] == asked and len(set(numbers)) == len(numbers) == asked
        print(f"{workers} worker(s): {asked} trials in {seconds:5.1f} s ({asked / seconds:5.1f} trials/s, "
              f"{reports / seconds:5.1f} epoch reports/s), {errors} errors; the storage holds "
              f"{dict(sorted(states.items()))}: {'every trial once' if whole else 'NOT every trial once'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trials", type=int, default=60, help="trials per worker")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  optuna {optuna.__version__}, SQLite, {SPACE.name}")
    for workers in args.workers:
        run(workers, args.trials)


if __name__ == "__main__":
    main()
