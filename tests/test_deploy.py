"""From a trained run to a served model: ``export`` with its parity proven, ``serve`` over real HTTP."""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakedata import QUICK, free_port, make_data_root
from PIL import Image

from lightning_cnn.cli import main
from lightning_cnn.experiments import CONFIG_DIR

pytest.importorskip("onnxruntime", reason="the serve extra (pip install 'lightning-cnn[serve]') is not installed")
pytest.importorskip("litserve", reason="the serve extra (pip install 'lightning-cnn[serve]') is not installed")

from lightning_cnn import export
from lightning_cnn.serve import INLINE_PIXELS, ClassifierAPI, decode_image

EXE = shutil.which("lightning-cnn")
ROOT = Path(__file__).resolve().parents[1]
# the whole (fake) test split; in fp32 on every machine (a bf16 CPU would pick bf16), as the exported model computes
FIT = [*QUICK, "--trainer.logger=false", "--trainer.limit_test_batches=null", "--trainer.precision=32-true"]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"), per_class_train=6)


@pytest.fixture(scope="module")
def runs(fake_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Trained runs (a few batches on fake data), trained when first asked for: config name -> run folder."""
    out = tmp_path_factory.mktemp("runs")
    trained: dict[str, Path] = {}

    class Runs(dict):  # type: ignore[type-arg]
        def __missing__(self, config: str) -> Path:
            extra = []
            if config == TTA:  # the MNIST network evaluated over mirrored and shifted views
                extra = ["--model.flip_test_time=true", "--model.translate_test_time=1"]
            if config == "split_cifar10_phase2_transfer":
                phase1 = self["split_cifar10_phase1"] / "checkpoints/best.ckpt"
                extra = [f"--model.network.init_args.checkpoint_path={phase1}"]
            shipped = CONFIG_DIR / f"{config.removesuffix('_tta')}.yaml"
            main(["fit", "--config", str(shipped), f"--data.data_dir={fake_root}", *FIT,
                  f"--trainer.default_root_dir={out / config}", *extra])  # fmt: skip
            self[config] = (out / config / "latest").resolve()
            return self[config]

    yield Runs(trained)


TTA = "mnist_tta"
NETWORKS = [
    "mnist",  # MNIST CNN
    TTA,  # MNIST CNN, test-time views: mirrored and shifted by a pixel
    "split_cifar10_phase2_transfer",  # a frozen phase-1 backbone under a new head
    pytest.param("cifar10_fast", marks=pytest.mark.slow),  # CIFAR CNN, mirror and 1-pixel shifts at test time
    pytest.param("cifar10_dropout", marks=pytest.mark.slow),  # CIFAR CNN with dropout
]


@pytest.mark.parametrize("config", NETWORKS)
def test_the_exported_model_computes_what_the_checkpoint_computes(
    config: str, runs: dict[str, Path], fake_root: Path
) -> None:
    run = runs[config]
    output, parity = export.export(run, verify=True)
    assert output == run / "export" / "model.onnx" and output.is_file()
    assert parity is not None and parity.holds, parity.report()
    # the whole fake test split
    test_images = {"mnist": 32, TTA: 32, "split_cifar10_phase2_transfer": 10}.get(config, 20)
    assert parity.images == test_images and parity.agreement == 1.0 and parity.max_difference <= 1e-4
    summary = json.loads((run / "summary.json").read_text())
    assert parity.run_accuracy == pytest.approx(summary["test"]["test/acc"])  # compared: fp32 run, its best.ckpt
    model = export.load_trained(run)
    assert model.flip_test_time == (config in ("cifar10_fast", TTA))
    assert model.translate_test_time == (1 if config in ("cifar10_fast", TTA) else 0)
    # what a deployer reads
    import onnxruntime as ort

    session = ort.InferenceSession(str(output))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == summary_class_names(run)
    assert json.loads(meta["input_shape"]) == [28, 28, 1] if config.startswith("mnist") else [32, 32, 3]
    assert meta["run"] == run.name and meta["experiment"] == config
    assert json.loads(meta["translate_test_time"]) == model.translate_test_time
    (images,) = session.get_inputs()
    assert images.type == "tensor(uint8)" and isinstance(images.shape[0], str)  # any batch size
    for batch in (1, 7):
        logits, probabilities = session.run(None, {"images": np.zeros((batch, *images.shape[1:]), np.uint8)})
        assert logits.shape == probabilities.shape == (batch, len(json.loads(meta["class_names"])))


def summary_class_names(run: Path) -> list[str]:
    return [str(n) for n in torch.load(run / "checkpoints/best.ckpt", weights_only=True)["class_names"]]


def test_a_torch_export_program_has_parity_too(runs: dict[str, Path], tmp_path: Path) -> None:
    output, parity = export.export(runs["mnist"], fmt="torch", output=tmp_path / "m.pt2", verify=True)
    assert parity is not None and parity.holds and parity.max_difference == 0.0, parity.report()
    extra = {export.PT2_METADATA: ""}
    program = torch.export.load(output, extra_files=extra)
    assert json.loads(json.loads(extra[export.PT2_METADATA])["input_shape"]) == [28, 28, 1]
    logits, _ = program.module()(torch.zeros(3, 28, 28, 1, dtype=torch.uint8))
    assert logits.shape == (3, 10)


def test_parity_fails_and_nothing_is_written_when_the_export_differs(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check can fail: an exported graph without the normalization the run trained with."""
    monkeypatch.setattr(export.TrainedModel, "metadata", lambda self: {})
    model = export.load_trained(runs["mnist"])
    wrong = export.TrainedModel(**{**model.__dict__, "mean": [0.0], "std": [1.0]})
    monkeypatch.setattr(export, "load_trained", lambda given: wrong)
    with pytest.raises(export.ParityError, match="FAILS"):
        export.export(runs["mnist"], output=tmp_path / "m.onnx", verify=True)
    assert not any(tmp_path.iterdir())


def test_the_exported_onnx_model_runs_without_torch(runs: dict[str, Path], tmp_path: Path) -> None:
    """The docs' snippet, in a process where importing torch or this package fails."""
    model, _ = export.export(runs["mnist"], output=tmp_path / "mnist.onnx")
    snippet = re.search(r"### Without torch.*?```python\n(.*?)```", (ROOT / "docs/deploy.md").read_text(), re.S)
    assert snippet is not None
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'lightning_cnn', 'lightning'):\n"
        "            raise ImportError(f'{name} is forbidden here')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    (tmp_path / "run.py").write_text(blocker + snippet.group(1))
    Image.new("L", (40, 30), 200).save(tmp_path / "digit.png")
    done = subprocess.run([sys.executable, "run.py", str(model), "digit.png"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    name, probability = done.stdout.split()
    assert name in [str(i) for i in range(10)] and 0.1 <= float(probability) <= 1.0


def test_export_bad_input_is_one_line_and_exit_2(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"mine")
    cases = [
        (["--ckpt_path", str(tmp_path / "foreign.ckpt")], "is not a checkpoint of a lightning-cnn run"),
        (["--ckpt_path", str(tmp_path / "text.ckpt")], "is not a readable PyTorch checkpoint"),
        (["--ckpt_path", str(tmp_path / "nowhere")], "does not exist"),
        (["--ckpt_path", str(runs["mnist"]), "--output", str(taken)], "exists; pass --overwrite"),
        (["--ckpt_path", str(runs["mnist"]), "--output", "/proc/version/m.onnx"], "Could not write"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["export", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert taken.read_bytes() == b"mine"


def test_a_checkpoint_naming_a_class_outside_the_package_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = torch.load(runs["mnist"] / "checkpoints/best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["network"]["class_path"] = "os.system"
    torch.save(checkpoint, tmp_path / "hostile.ckpt")
    with pytest.raises(export.CheckpointError, match=r"not one of lightning_cnn\.models's classes"):
        export.load_trained(tmp_path / "hostile.ckpt")


# ---------------------------------------------------------------------------------------------------- serve
def test_both_backends_give_the_same_probabilities(runs: dict[str, Path]) -> None:
    model = export.load_trained(runs["split_cifar10_phase2_transfer"])
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    answers = []
    for onnx in (export.onnx_model(model), None):
        api = ClassifierAPI(model.checkpoint, onnx, model.class_names, model.input_shape, threads=1)
        api.setup("cpu")
        batched = api.predict(api.batch([api.decode_request(_request(x)) for x in images]))
        single = [api.predict(api.decode_request(_request(x))) for x in images]
        np.testing.assert_allclose(np.stack(single), batched, atol=1e-6)
        answers.append([api.encode_response(p) for p in api.unbatch(batched)])
    for a, b in zip(*answers, strict=True):
        assert a["class"] == b["class"] and a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # setup() set a worker's handler in this process


def _request(pixels: np.ndarray) -> Any:
    return {"pixels": base64.b64encode(pixels.tobytes()).decode()}


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header says ``width x height``: a decompression bomb's first bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def test_decoding_refuses_what_is_no_usable_image() -> None:
    good = io.BytesIO()
    Image.new("RGBA", (64, 48), (10, 20, 30, 40)).save(good, "PNG")
    assert decode_image(good.getvalue(), (3, 32, 32)).shape == (32, 32, 3)
    assert decode_image(good.getvalue(), (1, 28, 28)).shape == (28, 28, 1)
    from fastapi import HTTPException

    for content, status in [(b"hello", 400), (good.getvalue()[:60], 400), (png_claiming(20_000, 20_000), 413)]:
        with pytest.raises(HTTPException) as refused:
            decode_image(content, (3, 32, 32))
        assert refused.value.status_code == status


def _post(port: int, body: bytes, content_type: str | None, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": content_type} if content_type else {}
    connection.request("POST", "/predict", body=body, headers=headers)
    response = connection.getresponse()
    status, content = response.status, response.read()
    connection.close()
    return status, json.loads(content)


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


class Server:
    """``lightning-cnn serve`` as a user starts it, in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        assert EXE is not None
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        command = [EXE, "serve", "--port", str(self.port), *args]
        self.log = cwd / f"serve-{self.port}.log"
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if _get(self.port, "/health", headers) == (200, b"ok"):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not become ready: {self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_the_served_model_answers_as_predict_does_refuses_bad_input_and_stops_on_sigterm(
    runs: dict[str, Path], fake_root: Path, tmp_path: Path
) -> None:
    run = runs["split_cifar10_phase1"]
    server = Server(tmp_path, "--ckpt_path", str(run), "--batch_timeout", "1.0", "--max_batch_size", "64")
    try:
        images = tmp_path / "images"
        images.mkdir()
        rng = np.random.default_rng(1)
        pictures = {
            "big.jpg": Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
            "gray.png": Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8), "L"),
            "rgba.png": Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA"),
            "large.png": Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)),  # decoded in a thread
        }
        assert INLINE_PIXELS < 160 * 200
        for name, picture in pictures.items():
            picture.save(images / name)
        main(["predict", "--config", str(CONFIG_DIR / "split_cifar10_phase1.yaml"), f"--ckpt_path={run}",
              f"--data.predict_dir={images}", f"--predictions.output={tmp_path / 'p.csv'}", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path / 'predict'}", "--trainer.precision=32-true"])  # fmt: skip
        expected = {Path(r["file"]).name: r for r in csv.DictReader((tmp_path / "p.csv").open())}
        server.wait_ready()
        assert server.log.read_text().count("lightning-cnn serve:") == 1  # one line with where it listens
        assert f"http://127.0.0.1:{server.port}" in server.log.read_text()
        status, info = _get(server.port, "/info")
        assert status == 200 and json.loads(info)["model"]["class_names"] == summary_class_names(run)

        def check_answer(name: str, status: int, answer: dict[str, Any]) -> None:
            assert status == 200, answer
            assert answer["class"] == expected[name]["predicted_class"]
            probability = float(expected[name]["probability"])
            assert answer["probabilities"][answer["class"]] == pytest.approx(probability, abs=1e-5)
            assert answer["index"] == summary_class_names(run).index(answer["class"])

        bad = [
            (b"not an image at all", "image/png", 400),
            (_encoded(pictures["big.jpg"], "JPEG")[:100], "image/jpeg", 400),
            (_encoded(pictures["large.png"], "PNG")[:5000], "image/png", 400),  # damaged past its header
            (b"", "image/png", 400),
            (png_claiming(20_000, 20_000), "image/png", 413),
            (b"\0" * (100 * 2**20), "application/octet-stream", 413),
            (b'{"pixels": "AAAA"}', "application/json", 415),
            (b"plain", None, 415),
        ]
        for body, content_type, want in bad:  # each refused alone, and the next request is served
            status, answer = _post(server.port, body, content_type)
            assert status == want and isinstance(answer["detail"], str) and "\n" not in answer["detail"], answer
            check_answer("gray.png", *_post(server.port, (images / "gray.png").read_bytes(), "image/png"))

        # requests in flight together (batched: the batch waits 1 s to fill), one bad among them, then SIGTERM
        results: dict[str, Any] = {}

        def send(key: str, body: bytes, content_type: str) -> None:
            results[key] = _post(server.port, body, content_type)

        threads = [threading.Thread(target=send, args=(n, (images / n).read_bytes(), "image/*")) for n in pictures]
        form = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
        form += (images / "big.jpg").read_bytes() + b"\r\n--XyZ--\r\n"
        threads.append(threading.Thread(target=send, args=("form", form, "multipart/form-data; boundary=XyZ")))
        threads.append(threading.Thread(target=send, args=("bad", b"junk", "image/png")))
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert server.stop() == 0, server.log.read_text()
        for thread in threads:
            thread.join()
        for name in pictures:
            check_answer(name, *results[name])
        check_answer("big.jpg", *results["form"])
        assert results["bad"][0] == 400
        assert "Traceback" not in server.log.read_text()
    finally:
        server.process.kill()


@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_serve_refuses_in_one_line_before_listening(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "broken.ckpt").write_bytes(b"\0" * 100)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, message in [
            (["--ckpt_path", "broken.ckpt"], "is not a readable PyTorch checkpoint"),
            (["--ckpt_path", str(runs["mnist"]), "--port", port], "Address already in use"),
        ]:
            assert EXE is not None
            done = subprocess.run([EXE, "serve", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
            errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
            assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stderr


BLOCKER = """
import sys
import lightning_cnn.checkpoints  # Lightning itself probes for optional packages: as installed, before the block
for name in [m for m in sys.modules if m.split('.')[0] in {blocked!r}]:
    del sys.modules[name]
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError(f'No module named {{name!r}}')
sys.meta_path.insert(0, Block())
from lightning_cnn.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    ("blocked", "command"),
    [(["litserve"], ["serve", "--ckpt_path", "x"]), (["onnxruntime", "onnx"], ["export", "--ckpt_path", "x"])],
)
def test_a_command_whose_extra_is_missing_says_which_in_one_line(
    blocked: list[str], command: list[str], tmp_path: Path
) -> None:
    script = BLOCKER.format(blocked=blocked)
    done = subprocess.run([sys.executable, "-c", script, *command], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "pip install 'lightning-cnn[serve]'" in done.stderr and blocked[0] in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_two_exports_to_one_file_at_once_leave_a_whole_model(runs: dict[str, Path], tmp_path: Path) -> None:
    assert EXE is not None
    target = tmp_path / "model.onnx"
    command = [EXE, "export", "--ckpt_path", str(runs["mnist"]), "--output", str(target), "--overwrite"]
    exports = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    import onnxruntime as ort

    seen = 0
    while any(p.poll() is None for p in exports):  # a reader meanwhile sees no file or a whole one
        if target.exists():
            ort.InferenceSession(str(target))
            seen += 1
        time.sleep(0.05)
    assert [p.wait() for p in exports] == [0, 0], [p.stderr.read() for p in exports if p.stderr]
    ort.InferenceSession(str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no partial file left


@pytest.mark.slow
@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_under_load_every_request_is_answered(runs: dict[str, Path], tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving import load

    server = Server(tmp_path, "--ckpt_path", str(runs["split_cifar10_phase1"]))
    try:
        server.wait_ready()
        body = _encoded(Image.new("RGB", (32, 32), (120, 30, 200)), "PNG")
        result = load(server.port, body, clients=32, seconds=20)
        assert result["errors"] == 0 and result["answered"] > 100, result
        assert server.stop() == 0
    finally:
        server.process.kill()


@pytest.mark.slow
@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_litserves_api_key_still_guards_the_server(runs: dict[str, Path], tmp_path: Path) -> None:
    """``serve`` replaces LitServe's no-op authorization by a faster one, but not its key check when it is set."""
    run = str(runs["split_cifar10_phase1"])
    server = Server(tmp_path, "--ckpt_path", run, "--workers", "1", env={"LIT_SERVER_API_KEY": "secret"})
    try:
        server.wait_ready(headers={"X-API-Key": "secret"})
        assert _get(server.port, "/health")[0] == 401
        body = _encoded(Image.new("RGB", (32, 32), (120, 30, 200)), "PNG")
        assert _post(server.port, body, "image/png")[0] == 401
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png", "X-API-Key": "secret"})
        assert connection.getresponse().status == 200
        assert "UserWarning" not in server.log.read_text()
        assert server.stop() == 0
    finally:
        server.process.kill()
