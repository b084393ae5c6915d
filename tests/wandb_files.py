"""Read a local W&B run (offline or synced) back from its ``run-*.wandb`` file.

A test helper: wandb >= 0.20 ships no Python reader for these files (its reader moved into the Go core),
and the tests check what W&B recorded without a server. It decodes W&B's private record format
(``wandb.proto.wandb_internal_pb2``), which is why it is no part of the package: ``compare`` reads a run's own
``summary.json`` and ``history.csv``. The file is a
LevelDB-style log (32 KiB blocks of records with 7-byte headers) of ``wandb_internal_pb2.Record``s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    pos, pending = _HEADER, b""  # the file opens with ":W&B", a 2-byte magic and a version byte
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < _HEADER or (length == 0 and kind == 0):
            pos += left  # block trailer padding
            continue
        if pos + _HEADER + length > len(data):
            return  # a record still being written (the run is live): stop before it
        chunk, pos = data[pos + _HEADER : pos + _HEADER + length], pos + _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def wandb_file(run_dir: Path) -> Path:
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir} is not a W&B run folder: it has no run-*.wandb file.")
    return files[0]


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run's config, metric history (one dict per ``log`` call), final summary and exit code.

    ``exit_code`` is ``None`` while the run has not ended, or when its process was killed before W&B wrote it.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    exit_code: int | None = None
    path = wandb_file(run_dir)
    for raw in _chunks(path.read_bytes()):
        record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf module
        try:
            record.ParseFromString(raw)
        except Exception as err:  # protobuf's DecodeError; its module path differs between versions
            raise ValueError(f"{path} is damaged ({type(err).__name__}); it cannot be read.") from err
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                target = row
                for part in parents:  # logged media and charts arrive as nested keys
                    target = target.setdefault(part, {})
                target[leaf] = json.loads(item.value_json)
            history.append(row)
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"config": config, "history": history, "summary": summary, "exit_code": exit_code}
