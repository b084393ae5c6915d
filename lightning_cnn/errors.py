"""Errors that mean bad input from the user. The CLI prints their message alone and exits with status 2."""

from __future__ import annotations

from jsonargparse import ArgumentError


class UserError(Exception):
    """Bad input: the message says what was wrong and what to do about it."""


class ConfigError(UserError, ValueError):
    """An impossible or inconsistent setting."""


class DataError(UserError, RuntimeError):
    """Data is missing, unreadable or malformed."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class ParityError(UserError):
    """An exported model does not compute what its checkpoint computes (exit status 1, one line)."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite (exit status 3)."""


def require_extra(what: str, modules: list[str], extra: str = "serve") -> None:
    """Raise a ConfigError naming the optional extra to install when one of ``modules`` cannot be imported."""
    import importlib

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"{what} needs {', '.join(missing)}, which is not installed: pip install "
                          f"'lightning-cnn[{extra}]'")  # fmt: skip


# Lines of jsonargparse's nested messages that say nothing the user can act on.
PARSER_NOISE = (
    "Subtypes:",
    "Errors:",
    "Given value type",
    "Given value: NestedArg",
    "Does not validate against any",
    "Expected a <class 'NoneType'>",
)


def checkpoint_mismatch(err: BaseException, argv: list[str]) -> CheckpointError | None:
    """A checkpoint of another architecture or class count: torch's size-mismatch error, as one line."""
    message = str(err)
    if not (isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in message):
        return None
    details = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    named = next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    named = named or next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--ckpt_path"), "the checkpoint")
    return CheckpointError(
        f"--ckpt_path {named} does not fit the configured model ({details[0] if details else message[:200]}). "
        "Use the config the checkpoint was trained with."
    )


def one_line(err: BaseException) -> str:
    lines = [line.strip().removeprefix("- ") for line in str(err).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(PARSER_NOISE)).rstrip(".") + "."


def user_error(err: BaseException | None) -> UserError | ArgumentError | None:
    """The UserError behind ``err`` (jsonargparse wraps errors raised while it instantiates classes), else the
    parser's own ArgumentError."""
    seen, parse_error = set(), None
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        if isinstance(err, ArgumentError) and parse_error is None:
            parse_error = err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return parse_error
