"""What the machine is best at: the training precision (and ``torch.compile``) chosen in code, not in configs.

Measured on this project's CPUs (docs/speed.md): with AVX-512 BF16 (or AMX) ``bf16-mixed`` trains the CIFAR CNN
1.5-1.9x as fast as fp32; without them bf16 is emulated and 2.7x *slower*. So the shipped configs leave precision
unset and the CLI picks it per machine; an explicit ``--trainer.precision`` always wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_cnn.errors import ConfigError

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


# Lightning's precision values and its legacy aliases for them (its own table is private API). A config or
# command line may give either ("bf16", 32); recipes keyed by precision must match both.
PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine",
              "transformer-engine-float16")  # fmt: skip
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def unified_precision(value: object) -> str | None:
    """A precision as Lightning trains it (``"bf16"`` -> ``"bf16-mixed"``, ``32`` -> ``"32-true"``); ``None`` for
    a value Lightning does not know.

    Example:
        >>> unified_precision(32), unified_precision("bf16"), unified_precision("bf16-mixed"), unified_precision("x")
        ('32-true', 'bf16-mixed', 'bf16-mixed', None)
    """
    text = str(value)
    text = PRECISION_ALIASES.get(text, text)
    return text if text in PRECISIONS else None


@dataclass(frozen=True)
class PrecisionChoice:
    """A Lightning ``precision`` value and why it was chosen, for the one line the CLI prints."""

    precision: str
    reason: str


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def choose_precision(
    accelerator: str | None, cuda: bool | None = None, flags: frozenset[str] | None = None
) -> PrecisionChoice | None:
    """The precision to train in on this machine, or ``None`` to leave Lightning's default.

    Args:
        accelerator: the trainer's ``accelerator`` setting (``auto``, ``cpu``, ``gpu``, ``cuda``, ...).
        cuda: whether a CUDA device will train (default: ``torch.cuda.is_available()``).
        flags: the CPU's feature flags (default: :func:`cpu_flags`).

    Example:
        >>> choose_precision("cpu", flags=frozenset({"avx512f", "avx512_bf16"})).precision
        'bf16-mixed'
        >>> choose_precision("cpu", flags=frozenset({"avx512f"})).precision
        '32-true'
    """
    accelerator = (accelerator or "auto").lower()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda):
        if cuda and torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16-mixed", f"{torch.cuda.get_device_name()} supports bf16")
        return PrecisionChoice("32-true", "this GPU has no bf16")
    if accelerator not in ("cpu", "auto"):
        return None  # mps, tpu, ...: Lightning's own default
    found = [f for f in BF16_CPU_FLAGS if f in (cpu_flags() if flags is None else flags)]
    if found:
        return PrecisionChoice("bf16-mixed", f"this CPU has {' and '.join(found)}")
    return PrecisionChoice("32-true", "this CPU has no AVX-512 BF16 or AMX, so bf16 would be emulated and slower")


def compile_pays(accelerator: str | None, cuda: bool | None = None) -> bool:
    """Whether ``torch.compile`` is worth its compile time here: on a CUDA GPU; not on CPU (measured slower)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return cuda and (accelerator or "auto").lower() in ("auto", "gpu", "cuda")


def precision_recipes(by_precision: Mapping[Any, Any] | None) -> dict[str, dict[str, Any]]:
    """A config's ``by_precision`` keyed by the precision Lightning trains in (``bf16`` read as ``bf16-mixed``).

    What a recipe can afford depends on the precision: bf16 trains 1.5-1.9x as fast as fp32 on a CPU that has
    it, so a time budget holds more epochs there, and a batch size can pay off in one precision and not the
    other. The precision is chosen in code for the machine (:func:`choose_precision`); the config says
    what goes with each.

    Raises:
        ConfigError: a key is no precision Lightning knows (a misspelt one would never apply).

    Example:
        >>> precision_recipes({"bf16": {"trainer.max_epochs": 18}})
        {'bf16-mixed': {'trainer.max_epochs': 18}}
    """
    recipes: dict[str, dict[str, Any]] = {}
    for name, recipe in (by_precision or {}).items():
        unified = unified_precision(name)
        if unified is None:
            raise ConfigError(f"by_precision.{name}: {name!r} is no precision Lightning trains in; use one of "
                              f"{', '.join(PRECISIONS)}.")  # fmt: skip
        recipes[unified] = dict(recipe or {})
    return recipes
