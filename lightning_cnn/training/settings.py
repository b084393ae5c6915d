"""What the CLI decides and checks in a parsed config before anything is built: the run folder, the precision
for this machine, and settings that would otherwise fail late or silently."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from lightning_cnn.checkpoints import read_checkpoint
from lightning_cnn.errors import CheckpointError, ConfigError
from lightning_cnn.training.hardware import PRECISIONS, choose_precision, compile_pays, unified_precision
from lightning_cnn.training.runs import CHECKPOINTS, RUN_ID_ENV, RunPlan, plan_run, process_rank


def choose_hardware_settings(config: Namespace) -> None:
    """Fill in the precision (and whether to compile) this machine is best at, where the config leaves them unset.

    Printed once (rank 0) and kept in the run's config.yaml, W&B config and summary.json.
    """
    trainer = config.trainer
    if trainer.get("precision") is None:
        choice = choose_precision(trainer.get("accelerator"))
        if choice is not None:
            trainer.precision = choice.precision
            if process_rank() == 0:
                print(f"Precision: {choice.precision} ({choice.reason}); --trainer.precision overrides it.")
    model = config.get("model")
    if model is not None and model.get("compile") is None:
        model.compile = compile_pays(trainer.get("accelerator"))


def apply_precision_recipe(config: Namespace, args: list[str]) -> None:
    """Apply the config's ``by_precision`` settings for the precision this run trains in.

    What a recipe can afford depends on the precision: bf16 trains about twice as fast as fp32 on a CPU that
    has it, so a time budget holds more epochs there (``cifar10_fast``: 18 in bf16, 17 in fp32), and a batch
    size can pay off in one precision and not the other. The precision is chosen in code for the machine
    (:func:`choose_hardware_settings`); the config says what goes with each. An option given on the command
    line (``--trainer.max_epochs 5``) wins over it.

    Raises:
        ConfigError: a ``by_precision`` entry is no precision Lightning knows (its aliases count: ``bf16``, ``32``),
            or names a setting the config does not have.
    """
    recipes = precision_recipes(config.get("by_precision"))
    chosen = recipes.get(unified_precision(config.trainer.get("precision")) or "")
    if not chosen:
        return
    given = {_plain_key(a[2:].split("=", 1)[0]) for a in args if a.startswith("--")}
    applied = []
    for key, value in chosen.items():
        if _plain_key(key) in given:
            continue
        try:
            config[key]
        except KeyError:
            raise ConfigError(
                f"by_precision.{config.trainer.precision}: {key} is not a setting of this config."
            ) from None
        config[key] = value
        applied.append(f"{key}={value}")
    if applied and process_rank() == 0:
        print(f"Recipe for {config.trainer.precision}: {', '.join(applied)} (the config's by_precision).")


def precision_recipes(by_precision: Mapping[Any, Any] | None) -> dict[str, Any]:
    """A config's ``by_precision`` keyed by the precision Lightning trains in (``bf16`` read as ``bf16-mixed``).

    Raises:
        ConfigError: a key is no precision Lightning knows (a misspelt one would never apply).
    """
    recipes: dict[str, Any] = {}
    for name, recipe in (by_precision or {}).items():
        unified = unified_precision(name)
        if unified is None:
            raise ConfigError(f"by_precision.{name}: {name!r} is no precision Lightning trains in; use one of "
                              f"{', '.join(PRECISIONS)}.")  # fmt: skip
        recipes[unified] = recipe
    return recipes


def _plain_key(key: str) -> str:
    return key.replace(".init_args.", ".")


SEED_RANGE = (0, 2**32 - 1)  # what numpy's and torch's generators accept


def check_settings(config: Namespace) -> None:
    """Refuse, in one line each, settings that Lightning or torch would accept silently or end in a traceback."""
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and isinstance(seed, int) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"seed_everything must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {seed}.")
    max_epochs = config.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs < -1:
        raise ConfigError(f"trainer.max_epochs must be a number of epochs (or -1: no limit), got {max_epochs}.")
    optimizer = config.model.get("optimizer")
    lr = optimizer.get("init_args", {}).get("lr") if isinstance(optimizer, Namespace) else None
    if isinstance(lr, int | float) and lr <= 0:
        raise ConfigError(f"model.optimizer.init_args.lr must be positive, got {lr}.")


def place_run(subcommand: str, config: Namespace) -> RunPlan:
    """Give the command its run folder: the trainer's root, the checkpoints and the W&B run all go there.

    The experiment folder is ``--trainer.default_root_dir`` when given (as Lightning's own root for its
    ``version_N`` folders), else ``runs/<experiment>``; the run folder is a new one inside it, or the run a
    ``fit`` resumes. An explicit ``--checkpoint.dirpath`` still wins for the checkpoints.
    """
    experiment = config.get("experiment") or _first_config_stem(config) or "lightning_cnn"
    config.experiment = experiment
    given = rerun_config(subcommand, config)
    trainer = config.trainer
    experiment_dir = Path(trainer.default_root_dir or Path("runs") / experiment)
    run = plan_run(subcommand, experiment_dir, config.get("ckpt_path"), process_rank(), config.get("run_id"))
    config.ckpt_path = run.ckpt_path
    trainer.default_root_dir = str(run.folder)
    if config.get("checkpoint") is not None and not config.checkpoint.get("dirpath"):
        config.checkpoint.dirpath = str(run.folder / CHECKPOINTS)
        config.last_checkpoint.dirpath = config.checkpoint.dirpath
    for logger in _logger_configs(trainer.get("logger")):
        if str(logger.get("class_path", "")).endswith("WandbLogger"):
            init = logger.init_args if logger.get("init_args") is not None else Namespace()
            logger.init_args = init
            init.save_dir = str(run.folder)
            init.name = init.get("name") or experiment
            init.id = run.folder.name  # the run id is the W&B id: a resumed run continues its W&B run
            init.resume = "allow" if run.resumed else None
    if run.created:
        os.environ[RUN_ID_ENV] = run.folder.name  # the processes Lightning starts for DDP join this run
        CREATED.append(run.folder)
    run.given = given
    return run


def rerun_config(subcommand: str, config: Namespace) -> Namespace:
    """The config as the run's ``config.yaml`` keeps it: the settings it trained with, without its placement.

    ``fit --config runs/<experiment>/<run id>/config.yaml`` then starts a new run of the same experiment with
    the same settings, next to the first. The folders :func:`place_run` fills in (the trainer's root, the
    checkpoint folder, the W&B folder and id) stay as the user gave them: a saved checkpoint folder would make
    the rerun write into the first run's checkpoints. A fit's run id and resume checkpoint are left out too.
    """
    given = config.clone()
    if given.get("run_id") is not None:
        given.run_id = None
    if subcommand == "fit":
        given.ckpt_path = None
    return given


CREATED: list[Path] = []  # run folders this process created, removed again if the run fails before a checkpoint


def discard_unstarted_runs() -> None:
    """Remove the run folders of this process that hold no checkpoint: a run that failed before training leaves
    nothing for a resume, the latest pointer or ``compare`` to pick up."""
    while CREATED:
        folder = CREATED.pop()
        if folder.is_dir() and not any(folder.rglob("*.ckpt")):
            shutil.rmtree(folder, ignore_errors=True)


def _logger_configs(value: Any) -> list[Namespace]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, Namespace)]


def _first_config_stem(config: Namespace) -> str | None:
    files = config.get("config") or []
    return Path(str(files[0])).stem if files else None


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
