"""The package's layers import downwards only: data -> models -> training -> reporting, base modules below all."""

from __future__ import annotations

import re
from pathlib import Path

import lightning_cnn

PACKAGE = Path(lightning_cnn.__file__).parent
LAYERS = {"data": 0, "models": 1, "training": 2, "reporting": 3}
TOP = ("cli", "study", "experiments")  # the commands and their config handling sit on top of every layer


def test_no_layer_imports_a_layer_above_it_or_the_commands() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        layer = LAYERS.get(parts[0]) if len(parts) > 1 else None
        for target in re.findall(r"(?:from|import) lightning_cnn\.(\w+)", path.read_text()):
            if layer is not None and (target in TOP or LAYERS.get(target, -1) > layer):
                upward.append(f"{path.relative_to(PACKAGE)} imports lightning_cnn.{target}")
    assert not upward


def test_base_modules_import_no_layer() -> None:
    for name in ("errors", "checkpoints"):
        text = (PACKAGE / f"{name}.py").read_text()
        assert not re.findall(r"(?:from|import) lightning_cnn\.(data|models|training|reporting|cli)", text), name
