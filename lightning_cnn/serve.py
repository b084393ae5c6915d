"""``lightning-cnn serve``: a trained run over HTTP, on LitServe (dynamic batching, worker processes).

``POST /predict`` takes one image: its bytes as the body (``Content-Type: image/png``, ``image/jpeg``, ...,
or ``application/octet-stream``) or a ``multipart/form-data`` upload. Any size and mode is converted as
``lightning-cnn predict`` converts it (RGB or gray, bilinear resize to the network's input). The answer is JSON:
``{"class": "cat", "index": 3, "probabilities": {"airplane": 0.01, ...}}``. Bad input gets a 4xx with
``{"detail": "<one line>"}`` and never fails another request. ``GET /health`` says ``ok`` once the workers are
ready; ``GET /info`` gives the class names, the input shape and the backend (LitServe's endpoints).
"""

# No `from __future__ import annotations` here: LitServe reads decode_request's annotation as a live object.
import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from lightning_cnn.cores import usable_cores
from lightning_cnn.data.predict import network_pixels
from lightning_cnn.errors import ConfigError

MAX_BODY_BYTES = 16 * 2**20  # an upload larger than this is refused (413), and not kept in memory
DRAIN_BYTES = 256 * 2**20  # how much of a too-large body is read (and dropped) before the 413
MAX_PIXELS = 40_000_000  # an image of more pixels is refused (413) before it is decoded: a decompression bomb
# An image of up to this many pixels is decoded in the HTTP server's event loop (a 32x32 PNG in 0.12 ms, a 128x128
# JPEG in 0.5 ms): handing each to a thread cost more than decoding it (12% of the HTTP process's time under load,
# py-spy). A larger one goes to a thread, so that decoding it holds no other request up.
INLINE_PIXELS = 128 * 128
RAW_TYPES = ("image/", "application/octet-stream")
PREDICT_PATH = "/predict"
WORKER_GRACE_SECONDS = 1.0  # how long an inference worker answers after a SIGTERM


class ImageUploads:
    """ASGI middleware: turns each ``POST /predict`` upload into the uint8 pixels the network takes, or a 4xx.

    Images are decoded here, in the HTTP process, not in LitServe's ``decode_request``: LitServe's batched loop
    answers every request of a batch with the error one of them raised, so one bad upload would fail the good
    ones batched with it. LitServe's own ``max_payload_size`` is not used since this middleware reads the body
    anyway and must answer a too-large one as it answers every other bad upload.

    Args:
        app: the ASGI app (LitServe's).
        input_shape: ``(C, H, W)`` of the network.
    """

    def __init__(self, app: Any, input_shape: tuple[int, int, int]) -> None:
        self.app, self.input_shape = app, input_shape

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PREDICT_PATH:
            return await self.app(scope, receive, send)
        try:
            pixels = await self._pixels(scope, receive)
        except HTTPException as refused:
            return await _send_json(send, refused.status_code, {"detail": refused.detail})
        body = json.dumps({"pixels": base64.b64encode(pixels.tobytes()).decode()}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()  # what follows the body: the client's disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    async def _pixels(self, scope: dict[str, Any], receive: Callable) -> np.ndarray:
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        multipart = content_type.startswith("multipart/form-data")
        if not multipart and not content_type.startswith(RAW_TYPES):
            raise HTTPException(415, f"Content-Type {content_type or '(none)'} is not an image: send the image's "
                                     "bytes as image/png, image/jpeg, ... or application/octet-stream, or a "
                                     "multipart/form-data upload")  # fmt: skip
        body = await _read_body(receive)
        if multipart:
            body = await _uploaded_file(scope, body)
        if not body:
            raise HTTPException(400, "the request has no image: its body is empty")
        return await _decoded(body, self.input_shape)


async def _read_body(receive: Callable) -> bytes:
    """The request's body; one over ``MAX_BODY_BYTES`` is read on without being kept (up to ``DRAIN_BYTES``),
    so that the client, which sends its whole body before it reads the answer, gets the 413."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPException(400, "the client went away before the body was complete")
        size += len(message.get("body", b""))
        if size <= MAX_BODY_BYTES:
            chunks.append(message.get("body", b""))
        if not message.get("more_body", False) or size > DRAIN_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise HTTPException(413, f"the body has {'more than ' if size > DRAIN_BYTES else ''}{size:,} bytes, more "
                                 f"than the limit of {MAX_BODY_BYTES:,}: send one image")  # fmt: skip
    return b"".join(chunks)


async def _uploaded_file(scope: dict[str, Any], body: bytes) -> bytes:
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def once() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form()
    except Exception as err:  # python-multipart's errors for a malformed form
        raise HTTPException(400, f"the multipart/form-data body cannot be parsed ({err})") from err
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if len(files) != 1:
        raise HTTPException(400, f"a multipart upload must hold exactly one file, it holds {len(files)}")
    return await files[0].read()


def decode_image(content: bytes, input_shape: tuple[int, int, int]) -> np.ndarray:
    """An image file's bytes as the network of ``input_shape`` ``(C, H, W)`` takes them: uint8 ``(H, W, C)``,
    converted as ``predict`` converts images.

    Raises:
        HTTPException: 400 when it is no image or a damaged one, 413 when it has more than ``MAX_PIXELS``.
    """
    with _refused_when_unusable(), _opened(content) as image:
        return network_pixels(image, input_shape)


async def _decoded(content: bytes, input_shape: tuple[int, int, int]) -> np.ndarray:
    """``decode_image`` in the event loop for an image of up to ``INLINE_PIXELS``, else in a thread."""
    with _refused_when_unusable(), _opened(content) as image:
        if image.width * image.height <= INLINE_PIXELS:
            return network_pixels(image, input_shape)
        return await asyncio.to_thread(network_pixels, image, input_shape)


def _opened(content: bytes) -> Image.Image:
    """The image with its header read (its pixels are decoded when first used); refused when too large."""
    with warnings.catch_warnings():  # no await inside: the filters are the process's, shared by coroutines
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(content))
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise HTTPException(413, f"the image is {image.width}x{image.height}, more than the limit of "
                                 f"{MAX_PIXELS:,} pixels")  # fmt: skip
    return image


@contextmanager
def _refused_when_unusable() -> Iterator[None]:
    """Pillow's errors for what is no usable image, as the 4xx the client gets."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise HTTPException(413, f"the image is too large to decode ({err})") from err
    except UnidentifiedImageError as err:
        raise HTTPException(400, "the body is not an image Pillow can read (PNG, JPEG, ...)") from err
    except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged data: Pillow's OSError and others
        raise HTTPException(400, f"the image is damaged or truncated ({err})") from err


async def no_authentication() -> None:
    """The server's authorization when ``LIT_SERVER_API_KEY`` asks for none. LitServe's own no-op is a plain
    function, which FastAPI runs in its thread pool for every request: 18% of the HTTP process's time under load
    (py-spy); a coroutine runs in the event loop."""


async def _send_json(send: Callable, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ClassifierAPI(ls.LitAPI):
    """The exported model (onnxruntime) or the checkpoint (eager torch) behind ``POST /predict``.

    Args:
        checkpoint: the ``.ckpt`` (for the torch backend).
        onnx: the exported ONNX model's bytes (for the onnxruntime backend); ``None``: the torch backend.
        class_names: the model's classes.
        input_shape: ``(C, H, W)``.
        threads: intra-op threads of each worker.
        max_batch_size: requests batched into one forward pass at most.
        batch_timeout: seconds a batch waits to fill.
    """

    def __init__(
        self,
        checkpoint: Path,
        onnx: bytes | None,
        class_names: list[str],
        input_shape: tuple[int, int, int],
        threads: int,
        max_batch_size: int = 1,
        batch_timeout: float = 0.0,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.checkpoint, self.onnx, self.class_names = checkpoint, onnx, class_names
        self.input_shape, self.threads = input_shape, threads
        self.run_model: Callable[[np.ndarray], np.ndarray] | None = None

    def setup(self, device: str) -> None:
        signal.signal(signal.SIGTERM, _exit_after_grace)
        from lightning_cnn.export import exported_runner, load_trained

        if self.onnx is not None:
            # Not spinning: a worker that busy-waits takes the CPU the HTTP processes need (one worker of 2 threads
            # on 2 cores spent 3.4-4.0 ms of CPU per request spinning, 1.4 not; docs/deploy.md).
            self.run_model = exported_runner("onnx", self.onnx, self.threads, "probabilities", spinning=False)
            return
        import torch

        torch.set_num_threads(self.threads)
        deployed = load_trained(self.checkpoint).deployable()

        def run_torch(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return deployed(torch.from_numpy(images))[1].numpy()

        self.run_model = run_torch

    def decode_request(self, request: ls.Request) -> np.ndarray:
        # Annotated Request since LitServe reads how to parse the body from this annotation (as JSON); what
        # arrives is that JSON: the pixels ImageUploads decoded.
        channels, height, width = self.input_shape
        pixels = np.frombuffer(base64.b64decode(request["pixels"]), dtype=np.uint8)
        return pixels.reshape(height, width, channels)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self.run_model is not None  # setup() made it
        return self.run_model(x) if x.ndim == 4 else self.run_model(x[None])[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        index = int(output.argmax())
        return {
            "class": self.class_names[index],
            "index": index,
            "probabilities": {name: float(p) for name, p in zip(self.class_names, output, strict=True)},
        }


def onnx_for(model: Any) -> tuple[bytes, str]:
    """The ONNX model of a trained model: the run's exported file when it is newer than the checkpoint, else
    exported now (in memory); and where it came from."""
    from lightning_cnn.export import default_output, onnx_model

    exported = default_output(model, "onnx")
    if exported.is_file() and exported.stat().st_mtime >= model.checkpoint.stat().st_mtime:
        return exported.read_bytes(), str(exported)
    return onnx_model(model), "exported at start"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-cnn serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a run folder (runs/<experiment>/latest) or a .ckpt")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 (default), 0.0.0.0, ::")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    cores = usable_cores()
    parser.add_argument("--workers", type=int, default=cores,
                        help=f"inference processes, each with an HTTP one (default {cores}: one a core)")  # fmt: skip
    # No batching by default: on a CPU the network costs the same per image in a batch as alone, and a batch waits
    # for --batch_timeout to fill (docs/deploy.md: one client gets a third of the throughput, 32 about the same).
    parser.add_argument("--max_batch_size", type=int, default=1,
                        help="requests batched into one forward pass at most (default 1: no batching)")  # fmt: skip
    parser.add_argument("--batch_timeout", type=float, default=0.005,
                        help="seconds a batch waits to fill (default 0.005)")  # fmt: skip
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                        help="onnxruntime on the exported model (default) or eager torch")  # fmt: skip
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_batch_size < 1 or args.batch_timeout < 0:
        raise ConfigError("--workers and --max_batch_size must be at least 1 and --batch_timeout not negative")
    if not 1024 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: choose a port from 1024 to 65535")
    if args.host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise ConfigError(f"--host {args.host}: LitServe listens on 127.0.0.1, 0.0.0.0 or ::")
    where = f"http://{'[::1]' if args.host == '::' else args.host}:{args.port}"
    _check_port(args.host, args.port, where)
    from lightning_cnn.export import load_trained

    model = load_trained(args.ckpt_path)  # before listening: a checkpoint that cannot be loaded ends here
    onnx, source = onnx_for(model) if args.backend == "onnxruntime" else (None, "")
    channels, height, width = model.input_shape
    threads = max(1, cores // args.workers)
    with warnings.catch_warnings():  # LitServe's warning that batch() goes unused when batches are off
        warnings.filterwarnings("ignore", "The LitServer has both batch and unbatch methods", UserWarning)
        api = ClassifierAPI(model.checkpoint, onnx, model.class_names, model.input_shape, threads,
                            args.max_batch_size, args.batch_timeout)  # fmt: skip
    if not os.environ.get("LIT_SERVER_API_KEY"):  # LitServe's key check (X-API-Key) when it is set
        api.authorize = no_authentication  # LitAPI's hook for authorization, here as a coroutine
    info = {
        "class_names": model.class_names,
        "input_shape": [height, width, channels],
        "backend": args.backend,
        "checkpoint": str(model.checkpoint),
    }
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, model_metadata=info,
                          middlewares=[(ImageUploads, {"input_shape": model.input_shape})])  # fmt: skip
    backend = f"onnxruntime, {source}" if onnx is not None else "eager torch"
    print(f"lightning-cnn serve: {model.checkpoint} ({backend}; {args.workers} worker(s) of {threads} thread(s) "
          f"and {args.workers} HTTP process(es), "
          f"batches of up to {args.max_batch_size}) on {where}: POST /predict, GET /health, GET /info",
          flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, _stop_as_ctrl_c(os.getpid()))
    try:
        server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)
    except KeyboardInterrupt:
        pass  # a second signal while LitServe shut down: it has stopped what it started
    except SystemExit as stop:  # uvicorn exits 1 when it cannot bind the port, after logging why
        if stop.code not in (0, None):
            raise ConfigError(f"cannot listen on {where}: is the port in use? Choose another with --port") from None
    print("lightning-cnn serve: stopped", file=sys.stderr)


def _check_port(host: str, port: int, where: str) -> None:
    """Fail in one line when the address cannot be listened on (uvicorn would log it and exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {where}: {err.strerror or err}. Choose another --port") from err


def _stop_as_ctrl_c(main_pid: int) -> Callable[[int, Any], None]:
    """A SIGTERM handler (docker stop, kill, a scheduler) that shuts the server down as Ctrl-C does: LitServe
    then stops its HTTP servers, which finish the requests in flight, then its workers.

    The processes LitServe forks (its HTTP servers, its queue manager) inherit the handler; there it ignores the
    signal, so that a SIGTERM sent to the whole process group (systemd, timeout) leaves them to the main
    process's orderly shutdown (uvicorn handles the signal itself while it serves).
    """

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt

    return stop


def _exit_after_grace(signum: int, frame: Any) -> None:
    """An inference worker's SIGTERM handler: go on answering for a moment, then exit. A SIGTERM sent to the
    whole process group reaches the workers as early as the HTTP servers, which then still wait for answers to
    the requests in flight; LitServe's own shutdown stops a worker only after its HTTP servers have finished."""
    threading.Timer(WORKER_GRACE_SECONDS, os._exit, (0,)).start()
