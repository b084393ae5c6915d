"""The shipped experiment configs (``lightning_cnn/configs/``), addressable by name from anywhere.

``lightning-cnn fit --config mnist`` reads the packaged ``mnist.yaml``; a path to a file still works as ever,
and so does ``configs/mnist.yaml`` from a clone (``configs`` there is a link to the packaged folder).

A variant config names the config it builds on with ``extends: NAME`` and holds only what differs; the command
line then gets ``--config NAME --config variant``, base first. (jsonargparse's own nested ``config:`` key is
not used: a later ``--trainer.logger false`` then fails to validate the variant's partial logger settings.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lightning_cnn.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_FLAGS = ("--config", "-c")


def shipped_config(name: str) -> Path | None:
    """The packaged config a name stands for (``mnist``, ``mnist.yaml``, ``configs/mnist.yaml``, ``overrides/ddp``).

    Example:
        >>> shipped_config("mnist").name
        'mnist.yaml'
        >>> shipped_config("no_such_experiment") is None
        True
    """
    relative = name.removeprefix("configs/")
    for candidate in (relative, f"{relative}.yaml"):
        path = CONFIG_DIR / candidate
        if path.is_file() and path.resolve().is_relative_to(CONFIG_DIR):
            return path
    return None


def resolve_config(value: str) -> str:
    """A ``--config`` value as the parser should get it: an existing file as given, else the shipped config.

    Raises:
        ConfigError: it is neither a file nor a shipped experiment.
    """
    if Path(value).is_file() or value.lstrip().startswith(("{", "[")) or "\n" in value:  # a file, or inline YAML
        return value
    shipped = shipped_config(value)
    if shipped is None:
        raise ConfigError(
            f"--config {value}: no such file, and no shipped experiment of that name. "
            "`lightning-cnn experiments` lists the shipped ones."
        )
    return str(shipped)


MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: the shipped configs are under 2 KiB
MAX_CONFIG_VALUES = 100_000  # values a config may expand to through YAML aliases (an alias bomb has billions)


def read_config(path: str | Path) -> Any:
    """A config file's content, read as untrusted input: bounded in size and in what its aliases expand to.

    Raises:
        ConfigError: the file is larger than 1 MiB, is not UTF-8, or expands past 100,000 values (an "alias bomb",
            which would take all memory); returns ``None`` for YAML that does not parse (the parser says why).
    """
    data = Path(path).read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {len(data):,} bytes; a config is at most {MAX_CONFIG_BYTES:,}. Is it a config?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save the config as UTF-8.") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # aliases stay references here: cheap for any file
    except yaml.YAMLError:
        return None
    if node is not None and _expanded_size(node, {}) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{path} expands to more than {MAX_CONFIG_VALUES:,} values through its YAML aliases "
                          "(&anchor / *alias); a config that large is refused.")  # fmt: skip
    return yaml.safe_load(text)


def _expanded_size(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values ``node`` becomes once every alias is copied out (counted once per node object)."""
    if id(node) not in seen:
        children = node.value if isinstance(node, yaml.CollectionNode) else []
        parts = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        seen[id(node)] = 1 + sum(_expanded_size(part, seen) for part in parts)
    return seen[id(node)]


def with_bases(path: str, seen: tuple[str, ...] = ()) -> list[str]:
    """The config files to read for ``path``: the configs it ``extends`` (recursively, base first), then itself.

    Raises:
        ConfigError: ``extends`` names no config, the chain comes back to a file already in it, or a file is no
            config that can be read safely (:func:`read_config`).
    """
    if path in seen:
        raise ConfigError(f"{path} extends itself through {' -> '.join(seen)}.")
    try:
        content = read_config(path)
    except OSError:
        return [path]  # not readable here: the parser reports it in its own words
    base = content.get("extends") if isinstance(content, dict) else None
    if not base:
        return [path]
    sibling = Path(path).parent / f"{base}.yaml"
    base_path = str(sibling) if sibling.is_file() else resolve_config(str(base))
    return [*with_bases(base_path, (*seen, path)), path]


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config``/``-c`` value resolved by :func:`resolve_config`, bases put before it."""
    resolved: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in CONFIG_FLAGS or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if value is None:
                resolved.append(arg)
                continue
            value = resolve_config(value)
            files = with_bases(value) if Path(value).is_file() else [value]
            resolved += [item for file in files for item in ("--config", file)]
        else:
            resolved.append(arg)
    return resolved


def default_experiment(argv: list[str]) -> str | None:
    """The experiment a command line names: the first config file the user gave, by its file name.

    A variant is its own experiment, not that of the configs it ``extends``; an override composed after it
    (``--config cifar10_fast --config overrides/cpu_ddp``) does not rename it. A config's ``experiment:`` or
    ``--experiment`` still wins.

    Example:
        >>> default_experiment(["fit", "--config", "cifar10_dropout", "--config=overrides/cpu_ddp"])
        'cifar10_dropout'
    """
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None and not value.lstrip().startswith(("{", "[")) and "\n" not in value:
            return Path(resolve_config(value)).stem
    return None


def experiments() -> dict[str, str]:
    """Each shipped config by name, with the first line of its header comment."""
    found = {}
    for path in sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name != "sweeps"):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        found[path.relative_to(CONFIG_DIR).with_suffix("").as_posix()] = first.lstrip("# ").strip()
    return found


def print_experiments() -> None:
    """``lightning-cnn experiments``: the shipped configs, one line each."""
    table = experiments()
    width = max(map(len, table))
    for name, description in table.items():
        print(f"{name:<{width}}  {description}")
    print("\nRun one with: lightning-cnn fit --config NAME (compose: --config NAME --config overrides/cpu_ddp)")
