"""``lightning-cnn tune``: hyperparameter search on Optuna, on one machine or many, from a W&B sweep file.

The search space is the W&B sweep format (``method``, ``metric``, ``parameters``, ``early_terminate``), so one
file drives both ``wandb agent`` (online) and ``tune`` (anywhere). Every trial is an ordinary run of
:func:`lightning_cnn.launch.fit` (run folder, summary, W&B run in the search's group). The search lives in a
storage Optuna shares between processes: by default an SQLite file in the search's folder (``runs/<name>/``),
so running the same command again continues it; ``--storage postgresql://...`` lets workers on many machines
join one search. A trial that stops heartbeating (its process was killed) is marked failed and tried again.

    lightning-cnn tune --config cifar10_dropout --space sweeps/cifar10_dropout --trials 20 --workers 2
    lightning-cnn tune --report cifar10-dropout-lr-batch-dropout
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lightning_cnn.cores import usable_cores
from lightning_cnn.errors import ConfigError, TrainingDiverged, UserError, one_line
from lightning_cnn.experiments import read_config
from lightning_cnn.files import write_atomically
from lightning_cnn.reporting.wandb_logger import wandb_disabled

SEARCH_DB = "search.db"  # the embedded storage, in the search's folder
HEARTBEAT_SECONDS = 5  # a running trial writes a heartbeat this often; one silent for 3x this is failed
STORAGE_WAIT_SECONDS = 10  # how long a storage server that does not answer is waited for
SWEEP_ONLY_KEYS = {"program", "command", "project", "entity", "name", "description", "run_cap"}  # W&B's own
DISTRIBUTIONS = {"uniform", "int_uniform", "log_uniform_values", "categorical", "constant"}


# ---------------------------------------------------------------------------------------------------- the space
@dataclass
class Space:
    """A W&B sweep file read for Optuna: what to search, towards what, and how.

    Attributes:
        name: the sweep's ``name``.
        method: ``bayes`` (TPE), ``random`` or ``grid``.
        metric: the logged metric judged (its best over the run's validations).
        maximize: the goal.
        parameters: dotted config key -> its W&B specification.
        min_epochs: ``early_terminate``'s ``min_iter`` (hyperband): epochs before a trial may be pruned.
    """

    name: str | None
    method: str
    metric: str
    maximize: bool
    parameters: dict[str, dict[str, Any]]
    min_epochs: int | None

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's settings, by dotted key (lists of values as W&B allows them: chosen by their JSON text)."""
        chosen = {}
        for key, spec in self.parameters.items():
            kind = _kind(spec)
            if kind == "constant":
                chosen[key] = spec["value"]
            elif kind == "categorical":
                chosen[key] = json.loads(trial.suggest_categorical(key, [json.dumps(v) for v in spec["values"]]))
            elif kind == "int_uniform":
                chosen[key] = trial.suggest_int(key, int(spec["min"]), int(spec["max"]))
            else:
                chosen[key] = trial.suggest_float(key, spec["min"], spec["max"], log=kind == "log_uniform_values")
        return chosen

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.method == "grid":
            grid = {k: [json.dumps(v) for v in s["values"]] for k, s in self.parameters.items() if "values" in s}
            return optuna.samplers.GridSampler(grid, seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def pruner(self) -> optuna.pruners.BasePruner:
        if self.min_epochs is not None:  # W&B's hyperband early termination: Optuna's successive halving
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.min_epochs)
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)

    def key(self) -> str:
        """What identifies the space: a study of this name that holds another space is refused."""
        return json.dumps({"method": self.method, "metric": self.metric, "maximize": self.maximize,
                           "parameters": self.parameters}, sort_keys=True)  # fmt: skip


def _kind(spec: Mapping[str, Any]) -> str:
    if "distribution" in spec:
        return str(spec["distribution"])
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    ints = isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int)
    return "int_uniform" if ints else "uniform"


def read_space(path: Path) -> Space:
    """A W&B sweep file as a :class:`Space`.

    Raises:
        ConfigError: a key Optuna cannot honour, an empty space, a range with min > max, a bad distribution.
    """
    raw = read_config(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"--space {path} is no sweep file (a YAML mapping with method, metric and parameters).")
    unknown = sorted(set(raw) - SWEEP_ONLY_KEYS - {"method", "metric", "parameters", "early_terminate"})
    if unknown:
        raise ConfigError(f"--space {path}: {', '.join(unknown)} cannot be honoured by tune (it reads method, "
                          "metric, parameters and early_terminate of a W&B sweep file).")  # fmt: skip
    method = raw.get("method", "bayes")
    if method not in ("bayes", "random", "grid"):
        raise ConfigError(f"--space {path}: method {method!r}; tune runs bayes (TPE), random or grid.")
    metric = raw.get("metric") or {"name": "val/acc", "goal": "maximize"}
    if not isinstance(metric, dict) or metric.get("goal", "maximize") not in ("maximize", "minimize"):
        raise ConfigError(f"--space {path}: metric needs a name and a goal of maximize or minimize.")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"--space {path} has no parameters to search: add some under parameters:.")
    for key, spec in parameters.items():
        _check_parameter(path, key, spec, method)
    early = raw.get("early_terminate")
    if early is not None and (not isinstance(early, dict) or early.get("type") != "hyperband"):
        raise ConfigError(f"--space {path}: early_terminate {early!r}; tune honours type: hyperband (min_iter).")
    return Space(raw.get("name"), method, str(metric.get("name", "val/acc")), metric.get("goal", "maximize") ==
                 "maximize", parameters, int(early.get("min_iter", 1)) if early else None)  # fmt: skip


def _check_parameter(path: Path, key: str, spec: Any, method: str) -> None:
    where = f"--space {path}: parameter {key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} needs values, value, or min and max.")
    kind = _kind(spec)
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: distribution {kind!r} cannot be honoured by tune; use one of "
                          f"{', '.join(sorted(DISTRIBUTIONS))}.")  # fmt: skip
    if kind == "categorical" and (not isinstance(spec.get("values"), list) or not spec["values"]):
        raise ConfigError(f"{where}: values must be a non-empty list.")
    if kind in ("uniform", "int_uniform", "log_uniform_values"):
        low, high = spec.get("min"), spec.get("max")
        if not isinstance(low, int | float) or not isinstance(high, int | float):
            raise ConfigError(f"{where}: {kind} needs numbers min and max.")
        if low > high:
            raise ConfigError(f"{where}: min {low} is above max {high}.")
        if kind == "log_uniform_values" and low <= 0:
            raise ConfigError(f"{where}: log_uniform_values needs min > 0, got {low}.")
    if method == "grid" and kind not in ("categorical", "constant"):
        raise ConfigError(f"{where}: method grid needs values for every parameter.")


# ---------------------------------------------------------------------------------------------------- trials
class Pruning(L.Callback):
    """Reports the metric to Optuna after each validation and ends a trial the pruner judges unpromising.

    Written here rather than taken from ``optuna-integration``: its callback raises ``TrialPruned`` inside
    Lightning's validation loop, which leaves the run interrupted (no summary, a resume hint); this one stops
    the trainer at the end of the epoch, so a pruned trial is a finished, shorter run like any other.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None or trainer.state.fn != "fit":
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if not last and self.trial.should_prune():  # stopping after the last epoch saves nothing: it completes
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True


class Objective:
    """One trial: the space's settings on the config, through the run API; its value the best metric."""

    def __init__(self, config: list[str], space: Space, name: str, root: Path, args: list[str]) -> None:
        self.config, self.space, self.name, self.root, self.args = config, space, name, root, args

    def __call__(self, trial: optuna.Trial) -> float:
        from lightning_cnn import launch

        settings = self.space.suggest(trial)
        pruning = Pruning(trial, self.space.metric)
        overrides = {**settings, "experiment": self.name, "trainer.default_root_dir": str(self.root)}
        record = launch.fit(self.config, overrides=overrides, args=self.args, group=self.name, callbacks=[pruning])
        assert record.folder is not None  # a fit's record has its run folder
        trial.set_user_attr("run", str(record.folder.resolve()))
        values = [row[self.space.metric] for row in record.history if _number(row.get(self.space.metric))]
        if not values:
            raise ConfigError(f"the runs log no {self.space.metric}: set metric.name in --space to a logged metric "
                              "(val/acc, val/loss, ...).")  # fmt: skip
        best = max(values) if self.space.maximize else min(values)
        if pruning.pruned_at is not None:
            trial.set_user_attr("pruned_at_epoch", pruning.pruned_at)
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at} ({self.space.metric} {best:.4f})")
        return float(best)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------- storage
def storage_for(url: str | None, folder: Path) -> RDBStorage:
    """Optuna's RDB storage: the URL given, or an SQLite file in the search's folder; heartbeats on, so a
    trial whose process died is failed and its settings tried again (once).

    Raises:
        ConfigError: the storage cannot be reached (after ``STORAGE_WAIT_SECONDS``) or opened.
    """
    if url is None:
        folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(folder / SEARCH_DB).resolve()}"
    connect: dict[str, Any] = {"timeout": 60} if url.startswith("sqlite") else {"connect_timeout": STORAGE_WAIT_SECONDS}
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # Optuna marks heartbeats experimental; users cannot act on that
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs={"connect_args": connect, "pool_pre_ping": True},
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=3 * HEARTBEAT_SECONDS,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (IntegrityError, ProgrammingError):
            # Workers that start together (a SLURM array) race to create Optuna's tables in a new database: the
            # losers' CREATE fails on PostgreSQL's catalog; the tables are there when they try again.
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
        except Exception as err:  # SQLAlchemy's OperationalError, ArgumentError, a missing driver's ImportError
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"--storage {_without_password(url)} cannot be used: {first}. Check the URL, that the "
                "server runs and that its driver is installed (psycopg for postgresql)."
            ) from err
    raise AssertionError("unreachable")


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_study(storage: RDBStorage, name: str, space: Space, seed: int) -> optuna.Study:
    """Create the search, or continue it; refuse a search of this name over another space."""
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize" if space.maximize else "minimize",
        sampler=space.sampler(seed),
        pruner=space.pruner(),
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("space")
    if recorded is None:
        study.set_user_attr("space", space.key())
    elif recorded != space.key():
        raise ConfigError(f"A search named {name} exists in this storage with another space; give this one another "
                          "--name, or the space it was started with.")  # fmt: skip
    return study


# ---------------------------------------------------------------------------------------------------- running
def work(config: list[str], space: Space, name: str, root: Path, args: list[str], url: str | None,
         trials: int, timeout: float | None, threads: int | None, seed: int) -> optuna.Study:  # fmt: skip
    """One worker: trials until the search holds ``trials`` finished ones (or ``timeout`` seconds passed)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    study = open_study(storage_for(url, root), name, space, seed)

    def enough(study: optuna.Study, trial: FrozenTrial) -> None:
        if _finished(study, trials):
            study.stop()

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial; the runs say more
    try:
        if not _finished(study, trials):
            study.optimize(Objective(config, space, name, root, args), timeout=timeout, catch=(TrainingDiverged,),
                           callbacks=[enough])  # fmt: skip
    finally:
        optuna.logging.set_verbosity(verbosity)  # a search called from Python leaves Optuna's logging as it was
    return study


def _finished(study: optuna.Study, trials: int) -> bool:
    """Whether the search holds ``trials`` completed or pruned trials (or as many failed ones: a search in which
    every trial fails ends too)."""
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    return done >= trials or len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) >= trials


def _work_in_process(*args: Any) -> None:
    try:
        work(*args)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: the parent reports it
        pass
    except UserError as err:  # bad input found by a trial: one line, as the command would say it
        print(f"lightning-cnn: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def search(
    config: list[str],
    space: Space,
    name: str,
    root: Path,
    args: list[str],
    url: str | None = None,
    trials: int = 10,
    workers: int = 1,
    timeout: float | None = None,
    seed: int = 0,
) -> optuna.Study:
    """Run (or continue) the search: ``workers`` processes, each with its share of the cores."""
    if workers == 1:
        return work(config, space, name, root, args, url, trials, timeout, None, seed)
    storage = storage_for(url, root)
    open_study(storage, name, space, seed)  # created once, before the workers race to create it
    threads = max(1, usable_cores() // workers)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_work_in_process,
                                 args=(config, space, name, root, args, url, trials, timeout, threads, seed + i))
                 for i in range(workers)]  # fmt: skip
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed and set(failed) == {2}:
        raise SystemExit(2)  # bad input, said by the workers
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} tune workers failed (exit status {failed[0]}); their "
                           "messages are above.")  # fmt: skip
    return optuna.load_study(study_name=name, storage=storage)


# ---------------------------------------------------------------------------------------------------- report
def report(study: optuna.Study, folder: Path) -> str:
    """``trials.md`` (every trial), ``best.yaml`` (the best trial's config, runnable as is), the optimization
    history and parameter importance pictures, and a W&B summary run when the trials kept W&B runs."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = sorted({k for t in trials for k in t.params})
    metric = json.loads(study.user_attrs.get("space", "{}")).get("metric", "value")
    header = ["trial", "state", metric, *keys, "seconds", "run"]
    rows = [[str(t.number), t.state.name.lower(), _value(t), *[_param(t, k) for k in keys], _seconds(t),
             t.user_attrs.get("run", "")] for t in trials]  # fmt: skip
    from lightning_cnn.reporting.record import markdown_table

    table = markdown_table(header, rows)
    counts = {
        s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)
    }
    lines = [f"# Search {study.study_name}", "", ", ".join(f"{n} {s}" for s, n in counts.items()), "", table]
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if best is not None:
        lines += ["", f"Best: trial {best.number}, {metric} {best.value:.4f}: "
                      + ", ".join(f"{k}={_param(best, k)}" for k in sorted(best.params))]  # fmt: skip
        run = Path(best.user_attrs.get("run", ""))
        if (run / "config.yaml").is_file():
            write_atomically(folder / "best.yaml", (run / "config.yaml").read_text())
            lines.append(f"Its config: {folder / 'best.yaml'} (lightning-cnn fit --config {folder / 'best.yaml'})")
    text = "\n".join(lines) + "\n"
    write_atomically(folder / "trials.md", text)
    _pictures(study, folder)
    logged = [t for t in trials if (Path(t.user_attrs.get("run", "")) / "wandb").is_dir()]
    if logged and not wandb_disabled():  # the trials kept W&B runs: the search's summary run joins their group
        _log_search_to_wandb(study.study_name, folder, header, rows)
    return text


def _log_search_to_wandb(name: str, folder: Path, header: list[str], rows: list[list[str]]) -> None:
    """The trials' table and the pictures into a W&B run of job type ``tune`` in the trials' group."""
    from lightning_cnn.reporting.wandb_logger import WandbLogger, current_wandb_run, finish_wandb_run_started_since

    before = current_wandb_run()
    logger = WandbLogger(name=f"{name}-search", group=name, job_type="tune", save_dir=str(folder), id=f"{name}-search")
    logger.log_table("tune/trials", columns=header, data=rows)
    pictures = [str(folder / p) for p in ("history.png", "importance.png") if (folder / p).is_file()]
    if pictures:
        logger.log_image("tune/pictures", pictures)
    finish_wandb_run_started_since(before, failed=False)


def _value(trial: FrozenTrial) -> str:
    if trial.value is not None:
        return f"{trial.value:.4f}"
    last = max(trial.intermediate_values.items(), default=None)
    return f"({last[1]:.4f} at epoch {last[0]})" if last else "-"


def _param(trial: FrozenTrial, key: str) -> str:
    value = trial.params.get(key)
    return "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def _seconds(trial: FrozenTrial) -> str:
    return f"{trial.duration.total_seconds():.0f}" if trial.duration else "-"


def _pictures(study: optuna.Study, folder: Path) -> None:
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    from lightning_cnn.reporting.plots import save_figure  # matplotlib, headless

    pictures = (("history.png", plots.plot_optimization_history), ("importance.png", plots.plot_param_importances))
    for name, plot in pictures:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                plot(study)
        except (ValueError, RuntimeError) as err:  # too few finished trials for importances
            print(f"lightning-cnn tune: no {name} yet ({err})")
            continue
        save_figure(plt.gcf(), folder / name)  # the figure Optuna drew on


# ---------------------------------------------------------------------------------------------------- command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-cnn tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="the experiment (a shipped name or a file; repeatable)")
    parser.add_argument("--space", type=Path, help="a W&B sweep file: method, metric, parameters, early_terminate")
    parser.add_argument("--trials", type=int, default=10, help="finished trials the search should hold (default 10)")
    parser.add_argument("--name", help="the search's name (default: the sweep file's name)")
    parser.add_argument("--storage", help="an RDB URL Optuna accepts (default: runs/<name>/search.db, SQLite)")
    parser.add_argument("--workers", type=int, default=1, help="trials run in parallel processes (default 1)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where searches go (default ./runs)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--report", metavar="NAME", help="only write the report of the search NAME")
    args, rest = parser.parse_known_args(argv)
    if args.report:
        name = args.report
        folder = args.dir / name
        if args.storage is None and not (folder / SEARCH_DB).is_file():
            raise ConfigError(f"No search {name} under {args.dir} (no {folder / SEARCH_DB}); pass --storage if "
                              "it lives in a database.")  # fmt: skip
        study = optuna.load_study(study_name=name, storage=storage_for(args.storage, folder))
        print(report(study, folder), end="")
        return
    if not args.config or args.space is None:
        raise ConfigError("tune needs --config EXPERIMENT and --space SWEEP_FILE (or --report NAME).")
    if args.trials < 1 or args.workers < 1:
        raise ConfigError("--trials and --workers must be at least 1.")
    space = read_space(_space_file(args.space))
    name = args.name or space.name or f"{Path(args.config[0]).stem}-{args.space.stem}"
    folder = args.dir / name
    _check_settings(args.config, space, rest)
    study = search(args.config, space, name, folder, rest, args.storage, args.trials, args.workers, args.timeout,
                   args.seed)  # fmt: skip
    print(report(study, folder), end="")


def _space_file(given: Path) -> Path:
    """A sweep file, or a shipped one by name (``sweeps/cifar10_dropout``)."""
    from lightning_cnn.experiments import CONFIG_DIR

    for candidate in (given, CONFIG_DIR / given, (CONFIG_DIR / given).with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"--space {given} does not exist (a sweep file, or a shipped one such as sweeps/cifar10_dropout)."
    )


def _check_settings(config: list[str], space: Space, args: list[str]) -> None:
    """Parse the config with one setting of each parameter, so that an unknown key fails before any trial."""
    from lightning_cnn import launch

    sample = {}
    for key, spec in space.parameters.items():
        kind = _kind(spec)
        sample[key] = (
            spec["value"] if kind == "constant" else spec["values"][0] if kind == "categorical" else spec["min"]
        )
    launch.check_options(config, sample, args)
