"""``lightning-cnn``: the commands, their exit statuses and their one-line errors.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (:mod:`lightning_cnn.launch`); ``compare``,
``study`` and ``experiments`` are this package's own.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from jsonargparse import ArgumentError

from lightning_cnn import __version__
from lightning_cnn.errors import (
    ParityError,
    TrainingDiverged,
    checkpoint_mismatch,
    one_line,
    require_extra,
    user_error,
)

# Exit statuses, as the README documents them.
EXIT_OK, EXIT_CRASH, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT  # and by Ctrl-C
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = f"""usage: lightning-cnn [--help] [--version] COMMAND ...

PyTorch Lightning collection for training and comparing small image classifiers (version {__version__}).

Lightning's commands (lightning-cnn COMMAND --help lists their options):
  fit                    train a config's model, then test its best checkpoint (fit --config mnist)
  validate               validate a trained model (--ckpt_path runs/<experiment>/latest)
  test                   test a trained model
  predict                predict the classes of a folder of images (--data.predict_dir)

"""
OTHER_COMMANDS = """other commands:
  compare RUN [RUN ...]  table and validation curves of runs (lightning-cnn compare --help)
  experiments            list the shipped experiment configs (lightning-cnn fit --config NAME)
  export                 a trained run as ONNX (or torch.export), preprocessing inside (export --help)
  serve                  a trained run over HTTP: POST an image to /predict (serve --help)
  study TARGET           a protocol or config over seeds, as mean ± std (lightning-cnn study --help)
  tune                   hyperparameter search of a W&B sweep file on Optuna (lightning-cnn tune --help)

Exit status: 0 success, 2 bad input, 3 training diverged, 143 interrupted by SIGTERM and 130 by Ctrl-C
(resume with --ckpt_path last), 1 anything else."""
USAGE += OTHER_COMMANDS


def main(args: list[str] | None = None) -> int:
    """The ``lightning-cnn`` command: 0 on success; bad input ends in one line on stderr and exit status 2.

    Other statuses: 3 when training diverged, 143 when a run was interrupted by SIGTERM (pre-emption), 130 by
    Ctrl-C, 1 for anything unexpected (with its traceback). See :func:`run` for the in-process API.
    """
    try:
        run(args)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Lightning turns Ctrl-C during training into sys.exit(1), inside its handler of the KeyboardInterrupt;
        # SIGTERM into its SIGTERMException (a SystemExit), which only a command that imported Lightning raises
        ctrl_c = isinstance(stop, KeyboardInterrupt) or isinstance(stop.__context__, KeyboardInterrupt)
        exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
        sigterm = exceptions is not None and isinstance(stop, exceptions.SIGTERMException)
        if not ctrl_c and not sigterm:
            raise
        command = (sys.argv[1:] if args is None else args)[:1]
        continues = {"study": "the study", "tune": "the search"}.get(command[0] if command else "")
        again = f"the same command (it continues {continues})" if continues else "the same command and --ckpt_path last"
        print(f"lightning-cnn: interrupted ({'Ctrl-C' if ctrl_c else 'SIGTERM'}); resume with {again}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(EXIT_INTERRUPTED if ctrl_c else EXIT_PREEMPTED) from None
    return EXIT_OK


def run(args: list[str] | None = None) -> Any:
    """Run a command in this process; a Trainer command returns its :class:`~lightning_cnn.launch.CNNCLI`.

    Raises:
        SystemExit: with status 2 (one line on stderr) for bad input, 3 when training diverged.
    """
    argv = sys.argv[1:] if args is None else list(args)
    # The console script passes its own argv on as args; sys.argv stays as it is, since Lightning's DDP launcher
    # starts the other processes from it.
    try:
        if argv[:1] == ["compare"]:
            from lightning_cnn.reporting.compare import main as compare

            return compare(argv[1:])
        if argv[:1] == ["study"]:
            from lightning_cnn.study import main as study

            return study(argv[1:])
        if argv[:1] == ["export"]:
            from lightning_cnn.export import main as export

            return export(argv[1:])
        if argv[:1] == ["serve"]:
            require_extra("lightning-cnn serve", ["litserve", "onnxruntime", "onnx", "onnxscript", "python_multipart"])
            from lightning_cnn.serve import main as serve

            return serve(argv[1:])
        if argv[:1] == ["tune"]:
            require_extra("lightning-cnn tune", ["optuna"], extra="tune")
            from lightning_cnn.tune import main as tune

            return tune(argv[1:])
        if argv[:1] == ["experiments"]:
            from lightning_cnn.experiments import print_experiments

            return print_experiments()
        if argv[:1] == ["--version"]:
            return print(f"lightning-cnn {__version__}")
        if argv in ([], ["--help"], ["-h"]):
            print(USAGE)  # without Lightning: the help of each command is its parser's
            raise SystemExit(EXIT_OK)
        from lightning_cnn.launch import cli

        return cli(argv, epilog=OTHER_COMMANDS)
    except Exception as err:
        cause = user_error(err) or checkpoint_mismatch(err, argv)
        if cause is None:
            raise
        command = next((a for a in argv if a in TRAINER_COMMANDS), None)
        hint = f" See lightning-cnn {command} --help" if isinstance(cause, ArgumentError) and command else ""
        print(f"lightning-cnn: error: {one_line(cause)}{hint}", file=sys.stderr)
        statuses: dict[type, int] = {TrainingDiverged: EXIT_DIVERGED, ParityError: EXIT_CRASH}
        status = statuses.get(type(cause), EXIT_BAD_INPUT)
        raise SystemExit(status) from None
