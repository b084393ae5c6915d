"""``lightning-cnn``: LightningCLI over the DataModules and the classifier; one YAML per experiment."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentError, DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_cnn import __version__
from lightning_cnn.checkpoints import AtomicCheckpointIO
from lightning_cnn.data import ResidentDataModule
from lightning_cnn.errors import checkpoint_mismatch, moved_class_hint, one_line, user_error
from lightning_cnn.experiments import resolve_config_args
from lightning_cnn.models import ImageClassifier, TransferNet
from lightning_cnn.reporting.report import RunReport
from lightning_cnn.reporting.wandb_logger import SaveConfigToRun, current_wandb_run, finish_wandb_run_started_since
from lightning_cnn.training.callbacks import (
    HangWatchdog,
    InterruptCheckpoint,
    PredictionCSVWriter,
    RNGState,
    ShareRunFolder,
    SlurmRequeue,
    StopOnNonFiniteLoss,
    TrainingDiverged,
    ValidateFinalEpoch,
)
from lightning_cnn.training.runs import CHECKPOINTS, CKPT_KEYWORDS, RUN_ID_ENV, point_latest
from lightning_cnn.training.settings import (
    CREATED,
    apply_precision_recipe,
    check_checkpoint,
    check_settings,
    check_writable,
    choose_hardware_settings,
    discard_unstarted_runs,
    place_run,
)

# Exit statuses, as the README documents them.
EXIT_OK, EXIT_CRASH, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM

OTHER_COMMANDS = """other commands:
  compare RUN [RUN ...]  table and validation curves of runs (lightning-cnn compare --help)
  experiments            list the shipped experiment configs (lightning-cnn fit --config NAME)
  study TARGET           a protocol or config over seeds, as mean ± std (lightning-cnn study --help)

Exit status: 0 success, 2 bad input, 3 training diverged, 143 interrupted (SIGTERM; resume with
--ckpt_path last), 1 anything else."""


class CNNCLI(LightningCLI):
    """LightningCLI that wires the data's class count and image shape into the network, and tests after fit."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--extends",
            type=str | None,
            default=None,
            help="In a config file: the config it builds on (read before it). Set on the command line: no effect.",
        )
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="Name of the experiment; its runs go to runs/<experiment>/<run id>/ (default: the config's name).",
        )
        parser.add_argument(
            "--by_precision",
            type=dict[str, dict[str, Any]] | None,
            default=None,
            help="In a config: settings that go with the precision this machine trains in, e.g. "
            "{bf16-mixed: {data.init_args.batch_size: 128}}; options given on the command line win.",
        )
        parser.add_argument(
            "--run_id",
            type=str | None,
            default=None,
            help="Name of the run folder and W&B run id (default: start time and random digits); it must be new.",
        )
        # What the data is flows one way, from the DataModule to the network and the classifier.
        for source, target in (
            ("num_classes", "model.network.init_args.num_classes"),
            ("input_shape", "model.network.init_args.input_shape"),
            ("num_classes", "model.num_classes"),
            ("class_names", "model.class_names"),
        ):
            parser.link_arguments(f"data.{source}", target, apply_on="instantiate")
        # Every run keeps its best (by val/acc) checkpoint and the last epoch's under fixed names in its own
        # folder, so a config can point at another run's checkpoint (phase 2 through runs/<phase 1>/latest) and
        # `fit --ckpt_path last` resumes. Two callbacks: Lightning's save_last only writes last.ckpt in epochs
        # that improved the monitored metric.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.enable_version_counter": False,
                "checkpoint.save_on_train_epoch_end": True,  # also in runs that validate every few epochs
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                "last_checkpoint.save_on_train_epoch_end": True,
            }
        )
        parser.add_lightning_class_args(PredictionCSVWriter, "predictions")
        parser.add_lightning_class_args(HangWatchdog, "hang_watchdog")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="After fit, test the best checkpoint (fit only)."
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        choose_hardware_settings(config)
        apply_precision_recipe(config, list(args or []))
        check_settings(config)
        # Before LightningCLI itself opens --ckpt_path (for its hyperparameters) with an opaque error.
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in CKPT_KEYWORDS and not Path(ckpt_path).is_dir():
            check_checkpoint(Path(ckpt_path))
        self.run = place_run(subcommand, config)
        self.save_config_kwargs["rerun_config"] = self.run.given

    def before_fit(self) -> None:
        """Refuse, before any work, an output folder that cannot be written."""
        self._watch_start()
        network = self.model.network if isinstance(self.model, ImageClassifier) else None
        if isinstance(network, TransferNet) and network.backbone_frozen:
            # the frozen backbone is in eval mode on purpose (TransferNet.train keeps it there)
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        if (self.trainer.check_val_every_n_epoch or 1) > 1:
            # The best checkpoint is saved at the end of a training epoch (so that it resumes cleanly); in the
            # epochs that do not validate there is no val/acc yet, which Lightning reports as a missing metric.
            warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val/acc'\)` could not find")
        if not self.trainer.is_global_zero:
            return
        folders: list[str | None] = [self.trainer.default_root_dir]
        folders += [
            str(c.dirpath) for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath
        ]
        for folder in filter(None, folders):
            check_writable(Path(folder))

    def before_validate(self) -> None:
        self._watch_start()

    def before_test(self) -> None:
        self._watch_start()

    def before_predict(self) -> None:
        self._watch_start()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, writing checkpoints atomically in place unless the config names its own plugins."""
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
            if SLURMEnvironment.detect():  # SlurmRequeue handles the requeue signal in place of Lightning
                kwargs["plugins"].append(SLURMEnvironment(auto_requeue=False))
        return super().instantiate_trainer(**kwargs)

    def _watch_start(self) -> None:
        """Arm the hang watchdog before the process group is set up: a rank that never joins hangs there."""
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, HangWatchdog):
                callback.arm(self.trainer)

    def after_fit(self) -> None:
        if self.trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Trainer.__init__, untyped  # a smoke run keeps no checkpoint: not a finished run
            return
        if self.config[self.subcommand].get("test_after_fit", True):
            monitored = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
            best = monitored[0].best_model_path if monitored else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        if self.trainer.is_global_zero and (self.run.folder / CHECKPOINTS).is_dir():
            point_latest(self.run.folder)
            print(f"Run folder: {self.run.folder} (now {self.run.folder.parent.name}/latest)")


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the epilog's lines kept as written."""


def main(args: list[str] | None = None) -> int:
    """The ``lightning-cnn`` command: 0 on success; bad input ends in one line on stderr and exit status 2.

    Other statuses: 3 when training diverged, 143 when a run was interrupted by SIGTERM (pre-emption), 1 for
    anything unexpected (with its traceback). See :func:`run` for the in-process API.
    """
    try:
        run(args)
    except SystemExit as exit_:
        if isinstance(exit_, SIGTERMException):
            print("lightning-cnn: interrupted by SIGTERM; resume with the same command and --ckpt_path last",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(EXIT_PREEMPTED) from None
        raise
    return EXIT_OK


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_third_party() -> None:
    """Filter the libraries' messages a user of this CLI cannot act on; real warnings stay.

    Lightning's advertisement for its hosted logger, its seed line (the seed is in the run's config), its
    model-summary note that bf16 sizes are estimated in fp32, deprecations inside Lightning and jsonargparse
    (their code, not ours), and LightningCLI's note about being called from Python (the console script
    passes its argv on as ``args``).
    """
    for name, starts in (
        ("lightning.pytorch.utilities.rank_zero", ("💡 Tip:",)),
        ("lightning.fabric.utilities.seed", ("Seed set to",)),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*starts))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
    jsonargparse = r".*(was deprecated in v4\.\d+|parameter was deprecated|per type is shown)"
    warnings.filterwarnings("ignore", message=jsonargparse)


def run(args: list[str] | None = None) -> CNNCLI | None:
    """Run the CLI in this process and return it (``None`` for commands that are not Trainer methods).

    Raises:
        SystemExit: with status 2 (one line on stderr) for bad input, 3 when training diverged.
    """
    argv = sys.argv[1:] if args is None else list(args)
    # The console script passes its own argv on as args (configs named by their shipped name resolved); sys.argv
    # stays as it is, since Lightning's DDP launcher starts the other processes from it.
    quiet_third_party()
    created_run = RUN_ID_ENV not in os.environ
    wandb_run_before, failed = current_wandb_run(), True
    try:
        if argv[:1] == ["compare"]:  # not a Trainer method, so not a LightningCLI subcommand
            from lightning_cnn.reporting.compare import main as compare

            compare(argv[1:])
            return None
        if argv[:1] == ["study"]:  # runs fit commands in this process, one per seed and phase
            from lightning_cnn.study import main as study

            study(argv[1:])
            failed = False
            return None
        if argv[:1] == ["experiments"]:
            from lightning_cnn.experiments import print_experiments

            print_experiments()
            return None
        if argv[:1] == ["--version"]:
            print(f"lightning-cnn {__version__}")
            return None
        cli = CNNCLI(
            ImageClassifier,
            ResidentDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [
                    ShareRunFolder(),
                    RNGState(),
                    ValidateFinalEpoch(),
                    StopOnNonFiniteLoss(),
                    InterruptCheckpoint(),
                    SlurmRequeue(),
                    RunReport(),
                ]
            },
            # exit_on_error=False: a mistake becomes one line below instead of ~90 lines of usage first
            parser_kwargs={
                "epilog": OTHER_COMMANDS,
                "formatter_class": _HelpFormatter,
                "exit_on_error": False,
                **{c: {"exit_on_error": False} for c in CNNCLI.subcommands()},
            },
            args=resolve_config_args(argv),
        )
        failed = False
        return cli
    except Exception as err:
        discard_unstarted_runs()
        cause = user_error(err) or checkpoint_mismatch(err, argv)
        if cause is None:
            raise
        subcommand = next((a for a in argv if a in CNNCLI.subcommands()), None)
        hint = f" See lightning-cnn {subcommand} --help" if isinstance(cause, ArgumentError) and subcommand else ""
        line = one_line(cause)
        print(f"lightning-cnn: error: {line}{moved_class_hint(line) or hint}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED if isinstance(cause, TrainingDiverged) else EXIT_BAD_INPUT) from None
    finally:
        finish_wandb_run_started_since(wandb_run_before, failed)
        CREATED.clear()
        if created_run:
            os.environ.pop(RUN_ID_ENV, None)
