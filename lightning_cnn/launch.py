"""Trainings in this process: the LightningCLI of the package and the Python API below every command.

``lightning-cnn fit|validate|test|predict`` and :func:`fit` both come here. The run is decided once, after the
config is parsed and before anything is built (:class:`~lightning_cnn.training.runs.Run`), and handed to what
writes into it: the checkpoint callbacks, the W&B logger, the run report and the saved config.

Example:
    >>> from lightning_cnn import launch
    >>> record = launch.fit("mnist", overrides={"trainer.max_epochs": 1})  # doctest: +SKIP
    >>> record.test("test/acc"), record.folder  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import threading
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_cnn.checkpoints import AtomicCheckpointIO, check_checkpoint
from lightning_cnn.data import ResidentDataModule
from lightning_cnn.errors import ConfigError
from lightning_cnn.experiments import default_experiment, read_config, resolve_config_args
from lightning_cnn.models import ImageClassifier, TransferNet
from lightning_cnn.reporting.record import RunRecord
from lightning_cnn.reporting.report import RunReport
from lightning_cnn.reporting.wandb_logger import SaveConfigToRun, WandbLogger, current_wandb_run
from lightning_cnn.reporting.wandb_logger import finish_wandb_run_started_since as finish_wandb_run
from lightning_cnn.training.callbacks import (
    HangWatchdog,
    InterruptCheckpoint,
    PredictionCSVWriter,
    RNGState,
    ShareRun,
    SlurmRequeue,
    StopOnNonFiniteLoss,
    ValidateFinalEpoch,
)
from lightning_cnn.training.hardware import choose_precision, compile_pays, precision_recipes, unified_precision
from lightning_cnn.training.runs import (
    CKPT_KEYWORDS,
    UNTRAINED,
    Run,
    check_writable,
    decide_run,
    point_latest,
    process_rank,
)

SEED_RANGE = (0, 2**32 - 1)  # what numpy's and torch's generators accept


class CNNCLI(LightningCLI):
    """LightningCLI that wires the data into the network, places each command in a run, and tests after fit.

    Args:
        group: the W&B group of the run (:func:`fit` passes a study's); the rest as ``LightningCLI``.
        callbacks: more callbacks for the trainer, as objects (:func:`fit` passes a search's pruning callback).
    """

    def __init__(
        self, *args: Any, group: str | None = None, callbacks: Sequence[L.Callback] = (), **kwargs: Any
    ) -> None:
        self.run: Run | None = None
        self.group, self.extra_callbacks = group, list(callbacks)
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if self.run is not None:
                self.run.discard_if_unstarted()
            raise
        finally:
            if self.run is not None:
                self.run.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name, kind, text in (
            ("extends", str, "In a config file: the config it builds on (read before it). On the command line: no "
             "effect."),
            ("experiment", str, "Name of the experiment; its runs go to runs/<experiment>/<run id>/ (default: the "
             "name of the first config given)."),
            ("by_precision", dict[str, dict[str, Any]], "In a config: settings that go with the precision this run "
             "trains in, e.g. {bf16-mixed: {data.init_args.batch_size: 128}}; later configs and options win."),
            ("run_id", str, "Name of the run folder and W&B run id (default: start time and random digits); it must "
             "be new."),
        ):  # fmt: skip
            parser.add_argument(f"--{name}", type=kind | None, default=None, help=text)
        parser.add_argument("--test_after_fit", type=bool, default=True, help="After fit, test the best checkpoint.")
        # What the data is flows one way, from the DataModule to the network and the classifier.
        for source, target in (("num_classes", "model.network.init_args.num_classes"),
                               ("input_shape", "model.network.init_args.input_shape"),
                               ("num_classes", "model.num_classes"), ("class_names", "model.class_names")):  # fmt: skip
            parser.link_arguments(f"data.{source}", target, apply_on="instantiate")
        # Every run keeps its best (by val/acc) checkpoint and the last epoch's under fixed names in its own
        # folder, so a config can point at another run's checkpoint (phase 2 through runs/<phase 1>/latest) and
        # `fit --ckpt_path last` resumes. Two callbacks: Lightning's save_last only writes last.ckpt in epochs
        # that improved the monitored metric.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.filename": "best",
            "checkpoint.enable_version_counter": False,
            "checkpoint.save_on_train_epoch_end": True,  # also in runs that validate every few epochs
            "last_checkpoint.filename": "last", "last_checkpoint.enable_version_counter": False,
            "last_checkpoint.save_on_train_epoch_end": True,
        })  # fmt: skip
        parser.add_lightning_class_args(PredictionCSVWriter, "predictions")
        parser.add_lightning_class_args(HangWatchdog, "hang_watchdog")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; where the machine and the precision's recipe add settings, parse again with them in place.

        They go in as arguments, where jsonargparse's precedence puts them: the precision chosen for this machine
        (and whether to compile) first, as defaults; a config's ``by_precision`` recipe right after that config,
        so every later config and option wins over it.
        """
        args = list(args)
        super().parse_arguments(parser, [a for a in args if not a.startswith("--print_config")])
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        command = args.index(subcommand) + 1
        defaults = machine_settings(config)
        chosen = next((d.split("=", 1)[1] for d in defaults if d.startswith("--trainer.precision=")), None)
        recipe = recipe_settings(config, config.trainer.get("precision") or chosen)
        if defaults or recipe or any(a.startswith("--print_config") for a in args):
            after = recipe_position(args, command)
            args = [*args[:command], *defaults, *args[command:after], *recipe, *args[after:]]
            super().parse_arguments(parser, args)
        check_settings(self.config[subcommand])
        # Before LightningCLI itself opens --ckpt_path (for its hyperparameters) with an opaque error.
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in (*CKPT_KEYWORDS, UNTRAINED) and not Path(ckpt_path).is_dir():
            check_checkpoint(Path(ckpt_path))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        experiment = config.get("experiment") or "lightning_cnn"
        root = Path(config.trainer.get("default_root_dir") or Path("runs") / experiment)
        self.run = decide_run(str(self.subcommand), experiment, root, config.get("ckpt_path"), config.get("run_id"),
                              self.group)  # fmt: skip
        self.save_config_kwargs["run"] = self.run

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer in the run's folder, with the run handed to the callbacks and loggers that write into it."""
        run, config = self.run, self.config_init[self.subcommand]
        assert run is not None  # decided before the classes are built
        for callback in (config["checkpoint"], config["last_checkpoint"]):
            callback.dirpath = callback.dirpath or str(run.checkpoint_dir.resolve())
        loggers = config["trainer"].get("logger")
        if isinstance(loggers, WandbLogger | list):
            kwargs["logger"] = [g.for_run(run) if isinstance(g, WandbLogger) else g for g in _listed(loggers)]
        ours = [ShareRun(run), RNGState(), ValidateFinalEpoch(), StopOnNonFiniteLoss(), InterruptCheckpoint(),
                SlurmRequeue(run), RunReport(run)]  # fmt: skip
        kwargs["callbacks"] = [*_listed(config["trainer"].get("callbacks")), *self.extra_callbacks, *ours]
        if not config["trainer"].get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
            if SLURMEnvironment.detect():  # SlurmRequeue handles the requeue signal in place of Lightning
                kwargs["plugins"].append(SLURMEnvironment(auto_requeue=False))
        trainer = super().instantiate_trainer(default_root_dir=str(run.folder), **kwargs)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, HangWatchdog):  # before the process group is set up: a rank may never join
                callback.arm(trainer)
        return trainer

    def fit(self, model: L.LightningModule, datamodule: Any = None, ckpt_path: str | None = None, **kw: Any) -> None:
        """Train (resuming from the run's checkpoint), test the best checkpoint, and point ``latest`` at the run."""
        assert self.run is not None
        trainer = self.trainer
        network = model.network if isinstance(model, ImageClassifier) else None
        if isinstance(network, TransferNet) and network.backbone_frozen:
            # the frozen backbone is in eval mode on purpose (TransferNet.train keeps it there)
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        if (trainer.check_val_every_n_epoch or 1) > 1:
            # The best checkpoint is saved at the end of a training epoch (so that it resumes cleanly); in the
            # epochs that do not validate there is no val/acc yet, which Lightning reports as a missing metric.
            warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val/acc'\)` could not find")
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        if trainer.is_global_zero:  # refuse, before any work, an output folder that cannot be written
            for folder in {self.run.folder, *(Path(c.dirpath) for c in checkpoints if c.dirpath)}:
                check_writable(folder)
        with _sigterm_between_phases(trainer) as stop_if_signalled:
            trainer.fit(model, datamodule, ckpt_path=self.run.ckpt_path, **kw)
            stop_if_signalled()
            if trainer.fast_dev_run:  # type: ignore[attr-defined]  # untyped; a smoke run keeps no checkpoint
                return
            if self.config[self.subcommand].get("test_after_fit"):
                best = next((c.best_model_path for c in checkpoints if c.monitor), "")
                trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
                stop_if_signalled()
        if trainer.is_global_zero and self.run.checkpoint_dir.is_dir():
            point_latest(self.run.folder)
            print(f"Run folder: {self.run.folder} (now {self.run.folder.parent.name}/latest)")

    def validate(self, model: L.LightningModule, datamodule: Any = None, **kw: Any) -> Any:
        return self.trainer.validate(model, datamodule, **{**kw, "ckpt_path": self.run.ckpt_path})  # type: ignore[union-attr]

    def test(self, model: L.LightningModule, datamodule: Any = None, **kw: Any) -> Any:
        return self.trainer.test(model, datamodule, **{**kw, "ckpt_path": self.run.ckpt_path})  # type: ignore[union-attr]

    def predict(self, model: L.LightningModule, datamodule: Any = None, **kw: Any) -> Any:
        return self.trainer.predict(model, datamodule, **{**kw, "ckpt_path": self.run.ckpt_path})  # type: ignore[union-attr]


@contextlib.contextmanager
def _sigterm_between_phases(trainer: L.Trainer) -> Iterator[Callable[[], None]]:
    """A SIGTERM at the end of a phase or between two stops the command (exit 143) as one inside a phase does.

    Lightning acts on SIGTERM only while a trainer method runs, at a batch boundary that is not the last: one that
    came after the last training batch, between fit and test, or in the test's last batch was logged and ignored
    (the run tested, moved ``latest`` and exited 0; a study went on to its next run). Lightning calls this
    handler too while it runs its own, so nothing is missed. Under DDP the ranks decide together.
    """
    received: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(1)) if main_thread else None

    def stop_if_signalled() -> None:
        stop = bool(received) or trainer.received_sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise SIGTERMException()

    try:
        yield stop_if_signalled
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def machine_settings(config: Any) -> list[str]:
    """Options for what the config leaves to the machine: the precision it trains best in, and whether to compile.

    Printed once (rank 0); kept in the run's config.yaml, W&B config and summary.json.
    """
    trainer, options = config.trainer, []
    if trainer.get("precision") is None:
        choice = choose_precision(trainer.get("accelerator"))
        if choice is not None:
            options.append(f"--trainer.precision={choice.precision}")
            if process_rank() == 0:
                print(f"Precision: {choice.precision} ({choice.reason}); --trainer.precision overrides it.")
    if config.get("model") is not None and config.model.get("compile") is None:
        options.append(f"--model.compile={str(compile_pays(trainer.get('accelerator'))).lower()}")
    return options


def recipe_settings(config: Any, precision: Any) -> list[str]:
    """The config's ``by_precision`` settings for ``precision`` (the one this run trains in), as options.

    Raises:
        ConfigError: a ``by_precision`` entry is no precision Lightning knows (its aliases count: ``bf16``, ``32``),
            or names a setting the config does not have.
    """
    chosen = precision_recipes(config.get("by_precision")).get(unified_precision(precision) or "", {})
    for key in chosen:  # as the command line takes it: data.batch_size or data.init_args.batch_size
        head, _, rest = key.partition(".")
        if not any(k in config for k in (key, f"{head}.init_args.{rest}")):
            raise ConfigError(f"by_precision.{precision}: {key} is not a setting of this config.")
    if chosen and process_rank() == 0:
        applied = ", ".join(f"{k}={v}" for k, v in chosen.items())
        print(f"Recipe for {precision}: {applied} (the config's by_precision; later configs and options win).")
    return [_option(key, value) for key, value in chosen.items()]


def recipe_position(args: list[str], start: int) -> int:
    """Where a recipe's options go: right after the last config file (or option) that sets ``by_precision``."""
    position = start
    for i, arg in enumerate(args[start:], start):
        if arg.startswith("--by_precision"):
            position = i + 1
        elif arg == "--config" and i + 1 < len(args) and _sets_by_precision(args[i + 1]):
            position = i + 2
    return position


def _sets_by_precision(path: str) -> bool:
    try:
        content = read_config(path)
    except OSError:
        return False
    return isinstance(content, dict) and "by_precision" in content


def check_settings(config: Any) -> None:
    """Refuse, in one line each, settings that Lightning or torch would accept silently or end in a traceback."""
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and isinstance(seed, int) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"seed_everything must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {seed}.")
    max_epochs = config.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs < -1:
        raise ConfigError(f"trainer.max_epochs must be a number of epochs (or -1: no limit), got {max_epochs}.")
    optimizer = config.get("model", {}).get("optimizer")
    lr = optimizer.get("init_args", {}).get("lr") if hasattr(optimizer, "get") else None
    if isinstance(lr, int | float) and lr <= 0:
        raise ConfigError(f"model.optimizer.init_args.lr must be positive, got {lr}.")


def _option(key: str, value: Any) -> str:
    """A setting as the parser reads it from a command line: text as it is, anything else as JSON (YAML)."""
    return f"--{key}={value if isinstance(value, str | Path) else json.dumps(value)}"


def _listed(value: Any) -> list[Any]:
    return [] if value is None or isinstance(value, bool) else list(value) if isinstance(value, list) else [value]


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """What a command changes in the process, undone when it returns: message filters, environment variables
    and its W&B run.

    Filtered are the libraries' messages a user cannot act on, real warnings stay: Lightning's advertisement for
    its hosted logger, its seed line (the seed is in the run's config), its model-summary note that bf16 sizes
    are estimated in fp32, deprecations inside Lightning and jsonargparse (their code, not ours), and
    LightningCLI's note about being called from Python (the console script passes its argv on as ``args``).
    A W&B run the command started is finished (Lightning's logger would log the next command into it).
    """
    filters = [(logging.getLogger("lightning.pytorch.utilities.rank_zero"), _DropMessages("💡 Tip:")),
               (logging.getLogger("lightning.fabric.utilities.seed"), _DropMessages("Seed set to"))]  # fmt: skip
    before, failed, environment = current_wandb_run(), True, dict(os.environ)
    with warnings.catch_warnings():
        for message in ("LightningCLI's args parameter is intended to run from within Python",
                        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        "Precision bf16-mixed is not supported by the model summary",
                        r"(?s).*(was deprecated in v4\.\d+|parameter was deprecated|per type is shown)"):  # fmt: skip
            warnings.filterwarnings("ignore", message=message)
        for logger, drop in filters:
            logger.addFilter(drop)
        try:
            yield
            failed = False
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)
            finish_wandb_run(before, failed)
            # Lightning's seeding leaves PL_GLOBAL_SEED and PL_SEED_WORKERS behind, for a later Trainer to seed by
            os.environ.clear()
            os.environ.update(environment)


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the epilog's lines kept as written."""


def cli(
    args: Sequence[str], group: str | None = None, epilog: str | None = None, callbacks: Sequence[L.Callback] = ()
) -> CNNCLI:
    """Run a LightningCLI command (``["fit", "--config", "mnist", ...]``) in this process and return it.

    Args:
        args: the command line after ``lightning-cnn``; shipped configs by name, ``extends`` resolved here.
        group: the W&B group of the run.
        epilog: text under the main ``--help``.
        callbacks: more callbacks for the trainer.

    Raises:
        UserError: bad input, with a one-line message; ``TrainingDiverged`` when the loss became NaN.
        jsonargparse.ArgumentError: an option the parser refuses.
        SystemExit: ``--help``, ``--print_config`` (0); SIGTERM (Lightning's ``SIGTERMException``).
    """
    args = list(args)
    resolved = resolve_config_args(args)
    experiment = default_experiment(args)
    command = next((i for i, a in enumerate(resolved) if a in CNNCLI.subcommands()), None)
    if experiment is not None and command is not None:  # first, so that any config or option naming one wins
        resolved.insert(command + 1, f"--experiment={experiment}")
    with command_scope():
        return CNNCLI(
            ImageClassifier,
            ResidentDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            # exit_on_error=False: a mistake becomes one line (lightning_cnn.cli) instead of ~90 lines of usage
            parser_kwargs={
                "exit_on_error": False,
                "epilog": epilog,
                "formatter_class": _HelpFormatter,
                **{c: {"exit_on_error": False} for c in CNNCLI.subcommands()},
            },
            args=resolved,
            group=group,
            callbacks=callbacks,
        )


def check_options(
    config: str | Path | Sequence[str | Path], overrides: Mapping[str, Any] | None = None, args: Sequence[str] = ()
) -> None:
    """Parse a fit of ``config`` with ``overrides`` and ``args`` and run nothing: an unknown key or a value of the
    wrong type raises here (jsonargparse's ``ArgumentError``), before any work (a search checks its space so)."""
    with contextlib.redirect_stdout(io.StringIO()):  # LightningCLI's --print_config parses, prints and exits 0
        try:
            cli([*_fit_args(config, overrides, args), "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise


def fit(
    config: str | Path | Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
    group: str | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> RunRecord:
    """Train (and test) one run, as ``lightning-cnn fit`` does, and return its record.

    Args:
        config: a shipped experiment's name or a config file, or several (composed in order).
        overrides: settings by their dotted keys (``{"seed_everything": 1, "trainer.max_epochs": 5,
            "run_id": "s1", "ckpt_path": "runs/mnist/s1"}``); they win over the configs and ``args``.
        args: options as on the command line (``["--data.data_dir=/data"]``), e.g. forwarded from a user.
        group: the W&B group of the run.
        callbacks: more callbacks for the trainer (objects; a config's ``trainer.callbacks`` stay).

    Raises:
        UserError: bad input or a failed run (see :func:`cli`); the run's folder is removed if nothing was trained.
    """
    done = cli(_fit_args(config, overrides, args), group=group, callbacks=callbacks)
    assert done.run is not None
    return RunRecord.read(done.run.folder)


def _fit_args(
    config: str | Path | Sequence[str | Path], overrides: Mapping[str, Any] | None, args: Sequence[str]
) -> list[str]:
    """The command line of a fit of ``config`` (a name, a file, or several) with ``args``, then ``overrides``."""
    configs = [config] if isinstance(config, str | Path) else list(config)
    options = [_option(key, value) for key, value in (overrides or {}).items()]
    return ["fit", *(a for c in configs for a in ("--config", str(c))), *args, *options]
