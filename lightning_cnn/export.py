"""``lightning-cnn export``: a trained run as a model anyone can deploy, its parity with the checkpoint proven.

The exported graph takes what a deployer has: uint8 images ``(N, H, W, C)`` (RGB, or one channel for a gray
network) at the network's input size. Scaling to [0, 1], the training set's mean and std, the layout change to
``(N, C, H, W)`` and the test-time flip averaging of runs that used it are inside, so no one re-implements
preprocessing. Outputs: ``logits`` and ``probabilities``, ``(N, classes)``. The class names, the input shape and
the normalization figures travel in the model's metadata.

Formats: ONNX (torch's ``torch.export``-based exporter, checked by ``onnx.checker``; runs in onnxruntime without
torch) and a ``torch.export`` program (``.pt2``, ``torch.export.load``).

Example:
    >>> from lightning_cnn.export import load_trained, onnx_model  # doctest: +SKIP
    >>> model = load_trained("runs/mnist/latest")  # doctest: +SKIP
    >>> content = onnx_model(model)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_cnn import __version__
from lightning_cnn.checkpoints import first_mismatch, read_checkpoint
from lightning_cnn.data.augment import Normalize
from lightning_cnn.errors import CheckpointError, ConfigError, ParityError, require_extra
from lightning_cnn.files import write_atomically
from lightning_cnn.models.networks import averaged_logits
from lightning_cnn.models.transfer import network_weights
from lightning_cnn.training.runs import CHECKPOINTS, best_checkpoint, run_folder_of

FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
MAX_LOGIT_DIFFERENCE = 1e-4  # what parity allows in fp32
PT2_METADATA = "metadata.json"  # the name of the metadata among a .pt2 program's extra files
NO_RUN = "is not a checkpoint of a lightning-cnn run"


@dataclass
class TrainedModel:
    """A trained network with what it takes as input, read from a checkpoint of this package's classifier.

    Attributes:
        checkpoint: the ``.ckpt`` file.
        network: the network in eval mode, on the CPU, in fp32.
        class_names: the names of outputs ``0 .. n-1``.
        input_shape: ``(C, H, W)`` the network takes.
        mean: per-channel mean of the [0, 1] pixels, subtracted before the network.
        std: per-channel standard deviation divided by after that.
        flip_test_time: the run evaluated the mean logits of each image and its mirror image.
        translate_test_time: and of the copies shifted by this many pixels (0: none).
        data: the DataModule's hyperparameters, for the test split.
        data_class: the DataModule's class.
        run: the checkpoint's run folder, if it lies in one.
    """

    checkpoint: Path
    network: nn.Module
    class_names: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    flip_test_time: bool
    translate_test_time: int
    data: dict[str, Any]
    data_class: type
    run: Path | None

    def metadata(self) -> dict[str, str]:
        """What a deployer needs to know of the model, as strings (ONNX metadata takes strings only)."""
        channels, height, width = self.input_shape
        return {
            "class_names": json.dumps(self.class_names),
            "input": f"uint8 (N, {height}, {width}, {channels}): {'RGB' if channels == 3 else 'gray'}, "
            "at this size; scaling and normalization are in the graph",
            "input_shape": json.dumps([height, width, channels]),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            "flip_test_time": json.dumps(self.flip_test_time),
            "translate_test_time": json.dumps(self.translate_test_time),
            "run": self.run.name if self.run else "",
            "experiment": self.run.parent.name if self.run else "",
            "checkpoint": self.checkpoint.name,
            "lightning_cnn_version": __version__,
        }

    def deployable(self) -> Deployed:
        return Deployed(self.network, self.mean, self.std, self.flip_test_time, self.translate_test_time).eval()

    def example(self, batch: int = 2) -> torch.Tensor:
        channels, height, width = self.input_shape
        return torch.zeros(batch, height, width, channels, dtype=torch.uint8)


class Deployed(nn.Module):
    """uint8 images ``(N, H, W, C)`` in, ``(logits, probabilities)`` out: the evaluation the run was tested with.

    Example:
        >>> from lightning_cnn.models import MNISTCNN
        >>> deployed = Deployed(MNISTCNN(), mean=[0.5], std=[0.5])
        >>> [t.shape for t in deployed(torch.zeros(3, 28, 28, 1, dtype=torch.uint8))]
        [torch.Size([3, 10]), torch.Size([3, 10])]
    """

    def __init__(
        self,
        network: nn.Module,
        mean: list[float],
        std: list[float],
        flip_test_time: bool = False,
        translate_test_time: int = 0,
    ) -> None:
        super().__init__()
        self.network = network.eval()
        self.flip_test_time, self.translate_test_time = flip_test_time, translate_test_time
        normalize = Normalize(mean, std)  # the training pipeline's own scaling, as buffers of the graph
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", normalize.scale)
        self.register_buffer("shift", normalize.shift)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.addcmul(self.shift, images.permute(0, 3, 1, 2).float(), self.scale)
        logits = averaged_logits(self.network, x, self.flip_test_time, self.translate_test_time)
        return logits, logits.softmax(dim=1)


# ---------------------------------------------------------------------------------------------------- loading
def resolve_checkpoint(given: str | Path) -> Path:
    """The ``.ckpt`` a user named: a file, or a run folder (``runs/<exp>/latest``) for its best checkpoint.

    Raises:
        CheckpointError: nothing is there, or the folder holds no checkpoint.
    """
    path = Path(given)
    if path.is_dir():
        return best_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"--ckpt_path {path} does not exist. Pass a run folder (runs/<experiment>/latest) or "
                              "a .ckpt file of one.")  # fmt: skip
    return path


def load_trained(given: str | Path) -> TrainedModel:
    """The trained network of a checkpoint (or run folder), rebuilt from what the checkpoint records.

    Only this package's networks are built (a checkpoint names its network's class; any other class is refused,
    so a checkpoint from elsewhere never runs code), and the weights must fit them exactly.

    Raises:
        CheckpointError: the file is not a checkpoint of a run of this package, or its weights do not fit.
    """
    path = resolve_checkpoint(given)
    checkpoint = read_checkpoint(path, "--ckpt_path", missing_hint="", unreadable_hint="Pass a run's best.ckpt.")
    hparams, data = checkpoint.get("hyper_parameters"), checkpoint.get("datamodule_hyper_parameters")
    names = checkpoint.get("class_names")
    if not isinstance(hparams, dict) or not isinstance(data, dict) or not isinstance(names, list) or not names:
        raise CheckpointError(f"--ckpt_path {path} {NO_RUN} (it records no model, data or class names). "
                              "Pass a run folder or a checkpoint that lightning-cnn fit wrote.")  # fmt: skip
    network = build_network(hparams.get("network"), path)
    try:
        network.load_state_dict(network_weights(checkpoint, path), strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"--ckpt_path {path}: its weights do not fit its network ({first_mismatch(err)})."
        ) from err
    datamodule = _package_class(data.get("_class_path"), "lightning_cnn.data", path)
    init_args = hparams["network"].get("init_args", {})
    shape = tuple(init_args.get("input_shape") or datamodule.input_shape)
    channels = int(shape[0])
    mean, std = list(data.get("mean", (0.0,))), list(data.get("std", (1.0,)))
    return TrainedModel(
        checkpoint=path,
        network=network.float().eval(),
        class_names=[str(n) for n in names],
        input_shape=(channels, int(shape[1]), int(shape[2])),
        mean=[float(m) for m in mean] * (channels // len(mean)),
        std=[float(s) for s in std] * (channels // len(std)),
        flip_test_time=bool(hparams.get("flip_test_time", False)),
        translate_test_time=int(hparams.get("translate_test_time", 0)),
        data=data,
        data_class=datamodule,
        run=run_folder_of(path.resolve()),
    )


def build_network(spec: Any, path: Path) -> nn.Module:
    """The network a checkpoint's hyperparameters describe (``class_path`` and ``init_args``), untrained.

    A TransferNet is built without its phase-1 checkpoint: the trained checkpoint holds its backbone too.
    """
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise CheckpointError(f"--ckpt_path {path} {NO_RUN} (it records no network class). Pass a checkpoint "
                              "that lightning-cnn fit wrote.")  # fmt: skip
    cls = _package_class(spec["class_path"], "lightning_cnn.models", path)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"--ckpt_path {path} names {spec['class_path']}, which is no network.")
    args = {
        key: build_network(value, path) if isinstance(value, Mapping) and "class_path" in value else value
        for key, value in dict(spec.get("init_args") or {}).items()
    }
    from lightning_cnn.models import TransferNet

    if cls is TransferNet:
        args["checkpoint_path"] = None
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"--ckpt_path {path}: cannot build its {cls.__name__} ({err}).") from err


def _package_class(class_path: Any, package: str, path: Path) -> Any:
    """A class exported by one of this package's subpackages (``lightning_cnn.models.CIFARCNN``), or refused."""
    import importlib

    name = str(class_path).rsplit(".", 1)[-1]
    found = getattr(importlib.import_module(package), name, None)
    if not str(class_path).startswith(package + ".") or not isinstance(found, type):
        raise CheckpointError(f"--ckpt_path {path} names {class_path!r}, which is not one of {package}'s classes; "
                              f"only this package's models and data are rebuilt from a checkpoint.")  # fmt: skip
    return found


# ---------------------------------------------------------------------------------------------------- export
def onnx_model(model: TrainedModel) -> bytes:
    """The model as an ONNX file's bytes (dynamic batch, metadata set, ``onnx.checker`` passed)."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model.deployable(),
        (model.example(),),
        dynamo=True,
        input_names=["images"],
        output_names=["logits", "probabilities"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    assert program is not None  # None only when given a file to write to
    proto = program.model_proto
    onnx.helper.set_model_props(proto, model.metadata())
    proto.producer_name, proto.producer_version = "lightning-cnn", __version__
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def torch_program(model: TrainedModel) -> bytes:
    """The model as a ``torch.export`` program's bytes (``.pt2``, dynamic batch, metadata as an extra file)."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model.deployable(), (model.example(),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={PT2_METADATA: json.dumps(model.metadata())})
    return buffer.getvalue()


def exported_runner(
    fmt: str, content: bytes, threads: int | None = None, output: str = "logits", spinning: bool = True
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from uint8 images ``(N, H, W, C)`` to the exported model's ``output`` (``logits`` or
    ``probabilities``), as a deployer runs it; ``threads``: onnxruntime's intra-op threads; ``spinning``: whether
    they busy-wait for work (onnxruntime's default: lower latency, but the cores it spins on are lost to any
    other process, such as a server's HTTP processes)."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        return lambda images: session.run([output], {"images": images})[0]
    program = torch.export.load(io.BytesIO(content)).module()
    index = ["logits", "probabilities"].index(output)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return program(torch.from_numpy(images))[index].numpy()

    return run


# ---------------------------------------------------------------------------------------------------- parity
@dataclass
class Parity:
    """The exported model against the checkpoint in eager PyTorch, on a whole test split."""

    images: int
    agreement: float  # share of images with the same top-1 class
    max_difference: float  # largest |logit difference|
    exported_accuracy: float
    eager_accuracy: float
    run_accuracy: float | None  # the run's summary.json test/acc, when this checkpoint is the one it tested

    @property
    def holds(self) -> bool:
        same_accuracy = self.run_accuracy is None or round(self.exported_accuracy, 6) == round(self.run_accuracy, 6)
        return self.agreement == 1.0 and self.max_difference <= MAX_LOGIT_DIFFERENCE and same_accuracy

    def report(self) -> str:
        run = "" if self.run_accuracy is None else f", the run's summary.json {self.run_accuracy:.6f}"
        return (
            f"parity on {self.images:,} test images: top-1 agreement {self.agreement:.2%}, max |logit difference| "
            f"{self.max_difference:.1e} (limit {MAX_LOGIT_DIFFERENCE:.0e}); test accuracy exported "
            f"{self.exported_accuracy:.6f}, eager checkpoint {self.eager_accuracy:.6f}{run}: "
            f"{'holds' if self.holds else 'FAILS'}"
        )


def check_parity(model: TrainedModel, run_exported: Callable[[np.ndarray], np.ndarray], data_dir: str | None) -> Parity:
    """Run the exported model and the checkpoint (as ``lightning-cnn test`` evaluates it) on the test split."""
    from lightning_cnn.models import ImageClassifier

    datamodule = evaluation_data(model, data_dir)
    classifier = ImageClassifier(
        model.network,
        class_names=model.class_names,
        flip_test_time=model.flip_test_time,
        translate_test_time=model.translate_test_time,
    )
    agree = exported_right = eager_right = total = 0
    worst = 0.0
    with torch.inference_mode():
        for images, labels in datamodule.test_dataloader():
            eager = classifier.eval_logits(datamodule.normalize(images)).float()
            exported = torch.from_numpy(run_exported(images.permute(0, 2, 3, 1).contiguous().numpy()))
            worst = max(worst, float((exported - eager).abs().max()))
            agree += int((exported.argmax(1) == eager.argmax(1)).sum())
            exported_right += int((exported.argmax(1) == labels).sum())
            eager_right += int((eager.argmax(1) == labels).sum())
            total += len(labels)
    return Parity(total, agree / total, worst, exported_right / total, eager_right / total, _run_accuracy(model))


def evaluation_data(model: TrainedModel, data_dir: str | None) -> Any:
    """The run's DataModule, set up for its test split (``data_dir``: instead of the one the run trained on)."""
    kwargs = {k: v for k, v in model.data.items() if not k.startswith("_") and k != "predict_dir"}
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    datamodule = model.data_class(**{**kwargs, "data_on_device": False})
    datamodule.setup("test")
    return datamodule


def _run_accuracy(model: TrainedModel) -> float | None:
    """The test accuracy the run's ``summary.json`` records, if the run tested this checkpoint (its best) in fp32
    (a run tested in bf16 gives other figures than the fp32 evaluation here, by rounding alone)."""
    if model.run is None:
        return None
    try:
        tested = best_checkpoint(model.run).resolve() == model.checkpoint.resolve()
        summary = json.loads((model.run / "summary.json").read_text())
        accuracy, precision = summary["test"]["test/acc"], str(summary.get("precision"))
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None
    return float(accuracy) if tested and precision in ("32", "32-true") else None


# ---------------------------------------------------------------------------------------------------- command
def default_output(model: TrainedModel, fmt: str) -> Path:
    """``<run>/export/model.onnx`` (or ``.pt2``) for a run's checkpoint, else beside the checkpoint."""
    suffix = FORMATS[fmt]
    if model.checkpoint.parent.name == CHECKPOINTS:
        return model.checkpoint.parent.parent / "export" / f"model{suffix}"
    return model.checkpoint.with_suffix(suffix)


def export(
    given: str | Path,
    fmt: str = "onnx",
    output: Path | None = None,
    overwrite: bool = False,
    verify: bool = False,
    data_dir: str | None = None,
) -> tuple[Path, Parity | None]:
    """Export a checkpoint (or a run folder's best one) and write it atomically; with ``verify``, only once
    parity on the test split holds.

    Raises:
        UserError: bad input (the checkpoint, the output, the data).
        ParityError: with ``verify``, the exported model does not compute what the checkpoint computes.
    """
    model = load_trained(given)
    output = output or default_output(model, fmt)
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it, or --output another file.")
    content = onnx_model(model) if fmt == "onnx" else torch_program(model)
    parity = None
    if verify:
        parity = check_parity(model, exported_runner(fmt, content), data_dir)
        if not parity.holds:
            raise ParityError(f"{parity.report()}. Nothing written.")
    write_atomically(output, content)
    return output, parity


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-cnn export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a run folder (runs/<experiment>/latest) or a .ckpt")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="onnx (default) or torch (.pt2)")
    parser.add_argument("--output", type=Path, help="the file to write (default: <run>/export/model.onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--verify", action="store_true",
                        help="before writing, prove parity with the checkpoint on the whole test split")  # fmt: skip
    parser.add_argument("--data_dir", help="data root for --verify (default: the one the run trained on)")
    args = parser.parse_args(argv)
    if args.format == "onnx":
        require_extra("export --format onnx", ["onnx", "onnxruntime", "onnxscript"])
    output, parity = export(args.ckpt_path, args.format, args.output, args.overwrite, args.verify, args.data_dir)
    if parity is not None:
        print(f"lightning-cnn export: {parity.report()}")
    print(f"lightning-cnn export: wrote {output}")
