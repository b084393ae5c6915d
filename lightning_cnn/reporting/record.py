"""The run record: what a run leaves for people and programs, in one type with one writer and one reader.

A run folder holds ``summary.json`` (figures, parameter counts, epochs, wall time, training images/s; after test
the ``test`` figures) and ``history.csv`` (one row per epoch). :class:`RunReport` writes them through
:meth:`RunRecord.write`; ``compare``, ``study``, the pictures and :func:`lightning_cnn.launch.fit` read them
through :meth:`RunRecord.read`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_cnn.errors import UserError
from lightning_cnn.files import write_atomically, write_json

SUMMARY = "summary.json"
HISTORY = "history.csv"
NUMBERS = ("parameters", "trainable_parameters", "epochs", "fit_seconds", "train_images_per_second")


@dataclass
class RunRecord:
    """A run's summary and its per-epoch history.

    Attributes:
        folder: the run folder it was read from or is written to (``None`` for a run read from W&B).
        summary: the figures of ``summary.json``; ``summary["test"]`` holds the test figures once tested.
        history: one row per epoch (``epoch``, ``step``, ``train/loss``, ``val/acc``, ``train_seconds``, ...).

    Example:
        >>> record = RunRecord(None, {"test": {"test/acc": 0.9}}, [{"epoch": 0.0, "val/acc": 0.5}, {"epoch": 1.0}])
        >>> record.finished, record.test("test/acc"), record.curve()
        (True, 0.9, [(1, 0.5, nan)])
    """

    folder: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the run was tested (a finished fit is tested unless told otherwise)."""
        return bool(self.summary.get("test"))

    @property
    def name(self) -> str:
        """The run id (a run folder's name), else the folder's name."""
        return str(self.summary.get("run") or (self.folder.name if self.folder else "run"))

    def test(self, key: str) -> float | None:
        value = self.summary.get("test", {}).get(key)
        return None if value is None else float(value)

    def curve(self, metric: str = "val/acc") -> list[tuple[int, float, float]]:
        """``(epochs trained, value, training seconds so far)`` of each epoch that has ``metric``."""
        return [
            (int(row["epoch"]) + 1, float(row[metric]), float(row.get("train_seconds", math.nan)))
            for row in self.history
            if row.get(metric) is not None and not math.isnan(float(row[metric]))
        ]

    def write(self) -> None:
        """Write ``summary.json`` and (when it has epochs) ``history.csv`` into :attr:`folder`, each atomically."""
        assert self.folder is not None, "a record is written into its run folder"
        write_json(self.folder / SUMMARY, self.summary)
        if not self.history:
            return
        keys = sorted({k for row in self.history for k in row}, key=lambda k: (k not in ("epoch", "step"), k))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, keys)
        writer.writeheader()
        writer.writerows(self.history)
        write_atomically(self.folder / HISTORY, text.getvalue())

    @classmethod
    def read(cls, folder: Path) -> RunRecord:
        """The record of a run folder.

        Raises:
            UserError: ``summary.json`` is missing, not JSON, or not a summary this package writes (one line).
        """
        path = folder / SUMMARY
        try:
            summary = json.loads(path.read_text())
        except OSError as err:
            raise UserError(f"{path} cannot be read ({err.strerror or err}); is {folder} a finished run?") from err
        except ValueError as err:
            raise UserError(f"{path} is not valid JSON ({err}); the run may have been cut off.") from err
        _check_summary(summary, path)
        history: list[dict[str, float]] = []
        if (folder / HISTORY).is_file():
            with open(folder / HISTORY, newline="") as f:
                history = [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]
        return cls(folder, summary, history)


def _check_summary(summary: Any, source: Path) -> None:
    """Refuse a summary that is not the object a run writes (a hand-edited or foreign file)."""
    if not isinstance(summary, dict) or not isinstance(summary.get("test", {}), dict):
        raise UserError(
            f"{source} is not a run summary of lightning-cnn (expected an object with a 'test' object of figures)."
        )
    wrong = [k for k in NUMBERS if k in summary and not isinstance(summary[k], int | float)]
    wrong += [k for k, v in summary.get("test", {}).items() if not isinstance(v, int | float)]
    if wrong:
        raise UserError(f"{source}: {', '.join(wrong)} should be numbers. The file is damaged or not a run summary.")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned (figures).

    Example:
        >>> print(markdown_table(["run", "acc"], [["a", "0.9"]]), end="")
        | run | acc |
        |---|---:|
        | a | 0.9 |
    """
    rule = "|---|" + "---:|" * (len(header) - 1)
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    return "\n".join([lines[0], rule, *lines[1:]]) + "\n"
