"""Inference speed of a trained run: eager torch vs onnxruntime offline, and ``lightning-cnn serve`` under load.

Offline: batches of 1 and 64 uint8 images through the deployed graph (preprocessing included), eager torch vs
the exported model in onnxruntime, the same threads, interleaved repeats, medians. Served: ``lightning-cnn serve``
started in a subprocess on 127.0.0.1; clients (threads, one keep-alive connection each) POST a 32x32 PNG as
fast as they are answered; latency p50/p99 and requests/s at 1, 8 and 32 clients for the default server (one
worker a core, no batching), with dynamic batching on, and with one worker; then one long run of the default at
32 clients that counts errors and lost requests.

    python benchmarks/serving.py --ckpt_path runs/cifar10_fast/latest [--seconds 5] [--rounds 3] [--load_seconds 60]

The clients run on the same machine as the server (on a 2-core VM they take a share of its cores).
"""

from __future__ import annotations

import argparse
import http.client
import io
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_cnn.cores import usable_cores
from lightning_cnn.export import exported_runner, load_trained, onnx_model


def offline(ckpt: str, repeats: int) -> None:
    model = load_trained(ckpt)
    deployed = model.deployable()
    onnx = exported_runner("onnx", onnx_model(model), threads=torch.get_num_threads())
    channels, height, width = model.input_shape
    print(f"offline ({torch.get_num_threads()} threads), ms per batch, median of {repeats} interleaved repeats:")
    for batch in (1, 64):
        images = np.random.default_rng(0).integers(0, 256, (batch, height, width, channels), dtype=np.uint8)
        tensor = torch.from_numpy(images)
        iterations = 200 if batch == 1 else 20

        def eager(tensor: torch.Tensor = tensor) -> None:
            with torch.inference_mode():
                deployed(tensor)

        def ort(images: np.ndarray = images) -> None:
            onnx(images)

        times: dict[str, list[float]] = {"eager torch": [], "onnxruntime": []}
        for _ in range(repeats):
            for name, run in (("eager torch", eager), ("onnxruntime", ort)):
                run()  # warm
                start = time.perf_counter()
                for _ in range(iterations):
                    run()
                times[name].append((time.perf_counter() - start) / iterations * 1000)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"  batch {batch:2d} {name:12s} median {medians[name]:7.3f} ms  repeats {[round(x, 3) for x in t]}")
        speed = medians["eager torch"] / medians["onnxruntime"]
        print(f"  batch {batch:2d} onnxruntime / eager torch speed: {speed:.2f}x")


class Client(threading.Thread):
    def __init__(self, port: int, body: bytes, until: float) -> None:
        super().__init__(daemon=True)
        self.port, self.body, self.until = port, body, until
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while time.monotonic() < self.until:
            start = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=self.body, headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    self.errors.append(str(response.status))
                    continue
            except (OSError, http.client.HTTPException) as err:
                self.errors.append(type(err).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            self.latencies.append(time.perf_counter() - start)
        connection.close()


def load(port: int, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    until = time.monotonic() + seconds
    threads = [Client(port, body, until) for _ in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    latencies = sorted(x for t in threads for x in t.latencies)
    errors = sum(len(t.errors) for t in threads)
    return {
        "requests/s": len(latencies) / elapsed,
        "p50 ms": 1000 * latencies[len(latencies) // 2],
        "p99 ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "answered": len(latencies),
        "errors": errors,
    }


def serve(ckpt: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    command = ["lightning-cnn", "serve", "--ckpt_path", ckpt, "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().read() == b"ok":
                return process, port
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("the server did not start")


def served(ckpt: str, seconds: float, load_seconds: float, repeats: int) -> None:
    channels, height, width = load_trained(ckpt).input_shape
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(buffer, "PNG")
    body = buffer.getvalue()
    rows = {
        f"default ({usable_cores()} workers)": (),
        "batching on (64, 5 ms)": ("--max_batch_size", "64", "--batch_timeout", "0.005"),
        "1 worker": ("--workers", "1"),
    }
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(repeats):  # the servers one after another, in rounds: drift of the machine hits each alike
        for label, args in rows.items():
            process, port = serve(ckpt, *args)
            try:
                load(port, body, 4, 2)  # warm
                for clients in (1, 8, 32):
                    results.setdefault((label, clients), []).append(load(port, body, clients, seconds))
            finally:
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=60) == 0, "the server did not exit 0 after SIGTERM"
    print(f"served ({usable_cores()} cores, clients on the same machine), {seconds:.0f} s per row, medians of "
          f"{repeats} rounds (every server exited 0 on SIGTERM):")  # fmt: skip
    for (label, clients), rs in results.items():
        errors = sum(r["errors"] for r in rs)
        medians = {key: statistics.median(r[key] for r in rs) for key in ("requests/s", "p50 ms", "p99 ms")}
        print(f"  {label:24s} {clients:2d} clients: {medians['requests/s']:6.1f} requests/s  "
              f"p50 {medians['p50 ms']:6.1f} ms  p99 {medians['p99 ms']:6.1f} ms  errors {errors}  repeats "
              f"{[(round(r['requests/s']), round(r['p99 ms'], 1)) for r in rs]}")  # fmt: skip
    if load_seconds > 0:
        label, args = next(iter(rows.items()))
        process, port = serve(ckpt, *args)
        try:
            r = load(port, body, 32, load_seconds)
            print(f"  load run of the {label}, 32 clients, {load_seconds:.0f} s: {r['answered']} answered, "
                  f"{r['errors']} errors, {r['requests/s']:.1f} requests/s, p99 {r['p99 ms']:.1f} ms")  # fmt: skip
        finally:
            process.send_signal(signal.SIGTERM)
            print(f"  server exit status after SIGTERM: {process.wait(timeout=60)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of load per served row")
    parser.add_argument("--load_seconds", type=float, default=60.0, help="seconds of the long load run (0: none)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the offline timings")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the served rows")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {Path(args.ckpt_path).resolve()}  python {sys.version.split()[0]}")
    offline(args.ckpt_path, args.repeats)
    served(args.ckpt_path, args.seconds, args.load_seconds, args.rounds)


if __name__ == "__main__":
    main()
