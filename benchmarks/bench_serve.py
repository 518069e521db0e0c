"""Serving speed: ONNX Runtime against PyTorch eager per image, and the HTTP service under load.

Part 1 runs each detector per image, one image at a time as a scoring service does, through
``OnnxPredictor`` (the export of ``visionautoml.deploy.export``, parity checked) and through the
PyTorch ``Predictor`` (the baseline), on the same images: raccoon photos when present, else
generated ones. Weights are random (no pretrained files offline), slightly perturbed so no two
boxes tie on score; the architecture, input size and post-processing, which set the cost, are
the real ones. Backends alternate, median of ``--repeat`` passes. One thread per inference by
default, as the service runs it (cores / ``--concurrency``): on a shared machine more OpenMP
threads than free cores spin at barriers and multiply PyTorch's CPU time.

Part 2 starts ``visionautoml serve`` twice on 127.0.0.1, once on the ONNX export and once with
``--backend pytorch`` (the baseline), and drives each with a closed-loop load generator: 1, 4
and 8 clients share ``--requests`` requests of one image each. It reports throughput, p50 and
p99 latency and the server's CPU time per request (read from /proc, steady on a shared machine).

    .venv/bin/python benchmarks/bench_serve.py [--models ssdlite320_mobilenet_v3_large,...]
        [--repeat 3] [--requests 48] [--images DIR] [--threads 1] [--no-service]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from visionautoml.config import TrainingParameters
from visionautoml.data.images import decode_image_file
from visionautoml.deploy.export import (
    OPSET,
    ExportError,
    export_detector,
    export_saved_model,
    synthetic_images,
)
from visionautoml.deploy.runtime import ONNX_FILE, SETTINGS_FILE, ExportSettings, OnnxPredictor
from visionautoml.models.predictor import Predictor
from visionautoml.models.saved import ModelSpec, save_model
from visionautoml.models.zoo import RAW_SCORE_THRESHOLD, build_model, score_threshold_at_most
from visionautoml.tracking.models import EXPORT_SUBDIR

RACCOON_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raccoon" / "images"
DEFAULT_MODELS = "ssdlite320_mobilenet_v3_large,fasterrcnn_mobilenet_v3_large_fpn"


def sample_images(folder: Path | None, count: int) -> tuple[list[Path], str]:
    folder = folder or (RACCOON_IMAGES if RACCOON_IMAGES.is_dir() else None)
    if folder is not None:
        paths = sorted(folder.glob("*.jpg"))[:count]
        return paths, f"{len(paths)} images from {folder}"
    target = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        pixels = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=generator).numpy()
        path = target / f"generated-{index}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths, f"{count} generated 500x375 images"


def trained_looking_model(name: str, directory: Path) -> tuple[torch.nn.Module, ModelSpec]:
    params = TrainingParameters(model_name=name, pretrained="none")
    torch.manual_seed(0)
    module = build_model(name, 2, params).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    spec = ModelSpec.from_params(params, ["raccoon"])
    save_model(module, spec, directory)
    return module, spec


def export_unchecked_if_needed(module: torch.nn.Module, spec: ModelSpec, directory: Path) -> tuple[Path, str]:
    """The checked export; else the same graph unchecked, since latency does not depend on the weights.

    Random weights leave overlapping boxes with near-equal scores (neighbouring anchors see
    the same noise), so a rounding difference upstream can make NMS keep the other box of a
    pair and the parity check fails for reasons a trained model does not have.
    """
    settings = ExportSettings.from_spec(spec)
    try:
        result = export_saved_model(
            module, settings, directory, synthetic_images(), sample_source="synthetic"
        )
        return result.directory, result.parity.summary()
    except ExportError as error:
        directory.mkdir(parents=True)
        sample = synthetic_images()[0].float() / 255
        with score_threshold_at_most(module, RAW_SCORE_THRESHOLD):
            outputs = export_detector(module, directory / ONNX_FILE, sample, model_name=spec.model_name)
        graph = settings.with_graph(outputs=outputs, opset=OPSET, graph_score_threshold=RAW_SCORE_THRESHOLD)
        (directory / SETTINGS_FILE).write_text(graph.to_json())
        return directory, f"random weights, exported unchecked: {str(error).split(': ', 1)[1]}"


def per_image(
    predict: Callable[[list[torch.Tensor]], object], images: list[torch.Tensor]
) -> tuple[float, float]:
    """(wall ms, CPU ms) per image, images scored one at a time."""
    wall, cpu = time.perf_counter(), time.process_time()
    for image in images:
        predict([image])
    count = len(images)
    return (time.perf_counter() - wall) * 1000 / count, (time.process_time() - cpu) * 1000 / count


def bench_models(
    models: list[str], images: list[torch.Tensor], repeat: int, threads: int, root: Path
) -> dict[str, Path]:
    torch.set_num_threads(threads)
    saved: dict[str, Path] = {}
    print(f"\nper-image latency, {threads} threads each, median of {repeat} passes (ms)\n")
    print(
        f"{'model':<38} {'backend':<13} {'wall':>7} {'speed-up':>9} {'CPU':>7} {'speed-up':>9}   wall passes"
    )
    for name in models:
        directory = root / name
        module, spec = trained_looking_model(name, directory)
        export, parity = export_unchecked_if_needed(module, spec, directory / EXPORT_SUBDIR)
        contenders = {
            "pytorch eager": Predictor(module, spec, batch_size=1).predict,
            "onnxruntime": OnnxPredictor(export, intra_op_threads=threads).predict,
        }
        for predict in contenders.values():
            predict(images[:2])
        runs: dict[str, list[tuple[float, float]]] = {backend: [] for backend in contenders}
        for attempt in range(repeat):
            order = list(contenders) if attempt % 2 == 0 else list(reversed(contenders))
            for backend in order:
                runs[backend].append(per_image(contenders[backend], images))
        wall = {backend: statistics.median(run[0] for run in values) for backend, values in runs.items()}
        cpu = {backend: statistics.median(run[1] for run in values) for backend, values in runs.items()}
        for backend, values in runs.items():
            listed = ", ".join(f"{run[0]:.1f}" for run in values)
            wall_ratio, cpu_ratio = wall["pytorch eager"] / wall[backend], cpu["pytorch eager"] / cpu[backend]
            print(
                f"{name:<38} {backend:<13} {wall[backend]:>7.1f} {wall_ratio:>8.2f}x "
                f"{cpu[backend]:>7.1f} {cpu_ratio:>8.2f}x   {listed}"
            )
        print(f"{'':<38} {parity}")
        saved[name] = directory
    return saved


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model: Path, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "visionautoml.cli", "serve", str(model), "--port", str(port)]
    command += ["--backend", backend, "--timeout", "300"]
    env = {key: value for key, value in os.environ.items() if key != "VISIONAUTOML_API_KEY"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the {backend} server did not start")


def load(url: str, image: tuple[str, bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    """Closed loop: ``clients`` threads send ``requests`` requests in all; (seconds, latencies in ms)."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        with httpx.Client(timeout=300) as session:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                started = time.perf_counter()
                response = session.post(url + "/score", files={"file": image})
                response.raise_for_status()
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


def bench_service(model: Path, image: Path, requests: int) -> None:
    payload = (image.name, image.read_bytes())
    results: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    for backend in ("pytorch", "onnx"):
        process, url = start_server(model, backend)
        try:
            load(url, payload, 2, 4)
            for clients in (1, 4, 8):
                before = cpu_seconds(process.pid)
                seconds, latencies = load(url, payload, clients, requests)
                cpu_ms = (cpu_seconds(process.pid) - before) * 1000 / requests
                p50, p99 = np.percentile(latencies, [50, 99])
                results[(backend, clients)] = (requests / seconds, float(p50), float(p99), cpu_ms)
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(
        f"\nservice on 127.0.0.1, {model.name}, {requests} requests of one image per level, --concurrency 2\n"
    )
    header = ("backend", "clients", "req/s", "ratio", "p50 ms", "p99 ms", "CPU ms/req")
    print("{:<9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>11}".format(*header))
    for (backend, clients), (rate, p50, p99, cpu_ms) in results.items():
        ratio = rate / results[("pytorch", clients)][0]
        print(
            f"{backend:<9} {clients:>7} {rate:>7.2f} {ratio:>6.2f}x {p50:>8.1f} {p99:>8.1f} {cpu_ms:>11.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated zoo names")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=Path, default=None, help="folder of JPEGs (default: raccoon)")
    parser.add_argument("--count", type=int, default=10, help="images per pass")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--no-service", action="store_true", help="part 1 only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per inference in part 1 (the service's: cores / concurrency)",
    )
    args = parser.parse_args()

    paths, described = sample_images(args.images, args.count)
    images = [decode_image_file(path) for path in paths]
    print(f"images: {described}; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as root:
        saved = bench_models(args.models.split(","), images, args.repeat, args.threads, Path(root))
        if not args.no_service:
            bench_service(saved[args.models.split(",")[0]], paths[0], args.requests)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
