"""``lightning-cnn``: LightningCLI over the DataModules and the classifier; one YAML per experiment."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_cnn.callbacks import InterruptCheckpoint, PredictionCSVWriter, RNGState, StopOnNonFiniteLoss
from lightning_cnn.checkpoints import read_checkpoint
from lightning_cnn.data import ResidentDataModule
from lightning_cnn.errors import CheckpointError, ConfigError, UserError
from lightning_cnn.loggers import SaveConfigToRun
from lightning_cnn.models import ImageClassifier
from lightning_cnn.reporting import RunReport


class CNNCLI(LightningCLI):
    """LightningCLI that wires the data's class count and image shape into the network, and tests after fit."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in (("num_classes", "num_classes"), ("input_shape", "input_shape")):
            parser.link_arguments(f"data.{source}", f"model.network.init_args.{target}", apply_on="instantiate")
        # Every run keeps its best (by val/acc) checkpoint and the last epoch's under fixed names, so a config
        # can point at another run's checkpoint (phase 2 transfer) and `fit --ckpt_path last` resumes. Two
        # callbacks: Lightning's save_last only writes last.ckpt in epochs that improved the monitored metric.
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
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="After fit, test the best checkpoint (fit only)."
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI itself opens --ckpt_path (for its hyperparameters) with an opaque error.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_checkpoint(Path(ckpt_path))

    def before_fit(self) -> None:
        """Refuse, before any work, an output folder that cannot be written."""
        folders: list[str | None] = [self.trainer.default_root_dir]
        folders += [getattr(c, "dirpath", None) for c in self.trainer.checkpoint_callbacks]
        for folder in filter(None, folders):
            check_writable(Path(folder))

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True) or getattr(self.trainer, "fast_dev_run", False):
            return
        monitored = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
        best = monitored[0].best_model_path if monitored else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def main(args: list[str] | None = None) -> CNNCLI | None:
    """Run the CLI; bad input ends in one line on stderr and exit status 2, not a traceback."""
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["compare"]:  # not a Trainer method, so not a LightningCLI subcommand
            from lightning_cnn.compare import main as compare

            compare(argv[1:])
            return None
        return CNNCLI(
            ImageClassifier,
            ResidentDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [RNGState(), StopOnNonFiniteLoss(), InterruptCheckpoint(), RunReport()]},
            args=args,
        )
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        print(f"lightning-cnn: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there, or raise a ConfigError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"Cannot write to the output folder {folder} ({err.strerror or err}). Choose a writable place with "
            "--trainer.default_root_dir and --checkpoint.dirpath."
        ) from err


def check_checkpoint(path: Path) -> None:
    """Raise a CheckpointError unless ``path`` is a complete checkpoint that loads with ``weights_only=True``."""
    state = read_checkpoint(
        path,
        "--ckpt_path",
        missing_hint="Pass a .ckpt file, or 'last' to resume.",
        unreadable_hint="Resume from another file (e.g. best.ckpt or last.ckpt beside it).",
    )
    if "state_dict" not in state:
        raise CheckpointError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict).")


def _user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind ``err``: jsonargparse wraps errors raised while it instantiates classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
