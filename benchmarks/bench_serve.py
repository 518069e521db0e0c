"""Serving speed of a trained detector: PyTorch eager, ONNX fp32, int8 and OpenVINO, per image and served.

Part 1 exports ``--model`` (a trained model: runs:/, models:/ or a saved-model folder) twice in
this run, fp32 (box parity against PyTorch) and ``--quantize int8`` (the accuracy gate: mAP@0.5
on the validation images within 0.01 of fp32), then scores the same photos one image at a time
through PyTorch eager (the baseline), ONNX Runtime and OpenVINO on each export, and through the
batched path (all photos in one call). Backends alternate, median of ``--repeat`` passes, wall
and CPU time. The int8 graph is timed even when the gate refuses it (built the same way without
the gate, and labelled so): a refused export is not written, but its speed is part of the answer.
Every row also gives the mAP@0.5 of that runtime on the validation images, the gate's metric.

Part 2 starts ``visionautoml serve`` on the fp32 export (each of ``--serve-backends``) with batching off
(``--max-batch 1``) and on (``--max-batch 8``), and drives it with a closed-loop load generator:
1 and 8 clients share ``--requests`` one-image requests per level; it reports throughput, p50 and
p99 latency, the p99 at 8 clients over the p99 at 1, and the server's CPU time per request.

    MLFLOW_TRACKING_URI=sqlite:///.visionautoml/mlflow.db .venv/bin/python benchmarks/bench_serve.py \\
        --model runs:/RUN_ID/model [--validation data/raccoon/validation_annotations.jsonl] \\
        [--repeat 5] [--count 10] [--threads 1] [--requests 48] [--no-service]

Train the model first: ``visionautoml data convert ../shared/datasets/raccoon --to jsonl --out
data/raccoon --validation-every 5`` and ``visionautoml train examples/raccoon-single.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
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

from visionautoml.data.images import decode_image_file
from visionautoml.deploy.export import ExportError, export_saved_model, gate_images
from visionautoml.deploy.quantize import ValidationSet, map50, quantize_graph
from visionautoml.deploy.runtime import ONNX_FILE, ExportSettings, OnnxPredictor
from visionautoml.errors import first_line
from visionautoml.models.predictor import Predictor
from visionautoml.models.saved import ModelSpec, load_model
from visionautoml.tracking.models import resolve_model

RACCOON_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raccoon" / "images"


def per_image(predict: Callable[[list[torch.Tensor]], object], images: list[torch.Tensor], batched: bool):
    """(wall ms, CPU ms) per image: one image per call, or all in one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    if batched:
        predict(images)
    else:
        for image in images:
            predict([image])
    count = len(images)
    return (time.perf_counter() - wall) * 1000 / count, (time.process_time() - cpu) * 1000 / count


def int8_graphs(
    module: torch.nn.Module, spec: ModelSpec, fp32: Path, target: Path, validation: ValidationSet
) -> str:
    """The int8 export, through the gate; if the gate refuses it, the same graphs built without it."""
    try:
        result = export_saved_model(
            module,
            ExportSettings.from_spec(spec),
            target,
            validation.images[:4],
            sample_source=validation.source,
            quantize="int8",
            validation=validation,
        )
        assert result.gate is not None
        return result.gate.summary()
    except ExportError as error:
        refused = first_line(error)
    shutil.copytree(fp32, target)
    settings = ExportSettings.read(fp32)
    pixels = [image.numpy().astype(np.float32) / np.float32(255.0) for image in validation.images]
    quantize_graph(fp32 / ONNX_FILE, target / ONNX_FILE, [{"image": p} for p in pixels], "minmax")
    if settings.batched is not None:
        pre = OnnxPredictor(fp32).batched_sessions()[0]
        resized = [{"images": pre.run(None, {"image": p})[0][None]} for p in pixels]
        quantize_graph(fp32 / settings.batched.core, target / settings.batched.core, resized, "minmax")
    return f"REFUSED by the gate (timed anyway, built without it): {refused}"


def bench_models(args: argparse.Namespace, images: list[torch.Tensor], root: Path) -> Path:
    torch.set_num_threads(args.threads)
    module, spec = load_model(resolve_model(args.model))
    validation = gate_images(args.model, [args.validation] if args.validation else [], list(spec.labels))
    started = time.perf_counter()
    fp32 = export_saved_model(
        module,
        ExportSettings.from_spec(spec),
        root / "fp32",
        validation.images[:4],
        sample_source=validation.source,
    )
    print(f"fp32 export in {time.perf_counter() - started:.0f} s:\n  {fp32.summary()}".replace("\n", "\n  "))
    started = time.perf_counter()
    gate = int8_graphs(module, spec, root / "fp32", root / "int8", validation)
    print(f"int8 export in {time.perf_counter() - started:.0f} s: {gate}")

    threads = args.threads
    contenders: dict[str, tuple[Callable, bool, Callable | None]] = {
        "pytorch eager": (Predictor(module, spec, batch_size=1).predict, False, None),
    }
    for precision in ("fp32", "int8"):
        for runtime, label in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
            try:
                predictor = OnnxPredictor(root / precision, intra_op_threads=threads, runtime=runtime)
            except Exception as error:  # openvino not installed: say so and go on
                print(f"{label} {precision}: skipped ({first_line(error)})")
                continue
            contenders[f"{label} {precision}"] = (predictor.predict, False, predictor.raw)
            if predictor.batched:
                contenders[f"{label} {precision} batched"] = (predictor.predict, True, None)
    for predict, batched, _ in contenders.values():
        per_image(predict, images[:2], batched)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for attempt in range(args.repeat):
        order = list(contenders) if attempt % 2 == 0 else list(reversed(contenders))
        for name in order:
            predict, batched, _ = contenders[name]
            runs[name].append(per_image(predict, images, batched))
    accuracy = {}
    classes = len(spec.labels)
    with torch.no_grad():  # the Predictor runs the module at the graphs' own low threshold
        eager_raw = [
            {k: v.numpy() for k, v in module([image.float() / 255])[0].items()} for image in validation.images
        ]
    accuracy["pytorch eager"] = map50(eager_raw, validation, classes)
    for name, (_, _, raw) in contenders.items():
        if raw is not None:
            accuracy[name] = map50(raw(validation.images), validation, classes)
    wall = {name: statistics.median(run[0] for run in values) for name, values in runs.items()}
    cpu = {name: statistics.median(run[1] for run in values) for name, values in runs.items()}
    eager = "pytorch eager"
    print(
        f"\nper-image latency on {len(images)} photos, {threads} thread(s) each, median of {args.repeat} "
        f"passes (ms); mAP@0.5 on {len(validation.images)} validation images\n"
    )
    print(
        f"{'runtime':<30} {'wall':>7} {'speed-up':>9} {'CPU':>7} {'speed-up':>9} {'mAP@0.5':>8}   wall passes"
    )
    for name in contenders:
        listed = ", ".join(f"{run[0]:.1f}" for run in runs[name])
        mean_ap = f"{accuracy[name]:.4f}" if name in accuracy else "(same)"
        print(
            f"{name:<30} {wall[name]:>7.1f} {wall[eager] / wall[name]:>8.2f}x {cpu[name]:>7.1f} "
            f"{cpu[eager] / cpu[name]:>8.2f}x {mean_ap:>8}   {listed}"
        )
    return root / "fp32"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def server_pids(process: subprocess.Popen) -> list[int]:
    pids = [process.pid]
    for children in Path(f"/proc/{process.pid}/task").glob("*/children"):
        pids += [int(pid) for pid in children.read_text().split()]
    return pids


def start_server(export: Path, backend: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "visionautoml.cli", "serve", str(export), "--port", str(port)]
    command += ["--backend", backend, "--timeout", "300", *extra]
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
    stop(process)
    raise SystemExit(f"the {backend} server did not start")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


def bench_service(export: Path, image: Path, args: argparse.Namespace, backend: str) -> None:
    payload = (image.name, image.read_bytes())
    results: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    modes = {"batching off": ["--max-batch", "1"], "batching on": ["--max-batch", "8"]}
    for mode, extra in modes.items():
        process, url = start_server(export, backend, [*extra, "--concurrency", str(args.concurrency)])
        try:
            load(url, payload, 2, 8)
            pids = server_pids(process)
            for clients in (1, 8):
                before = cpu_seconds(pids)
                seconds, latencies = load(url, payload, clients, args.requests)
                cpu_ms = (cpu_seconds(pids) - before) * 1000 / args.requests
                p50, p99 = np.percentile(latencies, [50, 99])
                results[(mode, clients)] = (args.requests / seconds, float(p50), float(p99), cpu_ms)
        finally:
            stop(process)
    print(
        f"\nservice on 127.0.0.1: {backend} fp32 export, {args.requests} one-image requests per "
        f"level, --concurrency {args.concurrency}\n"
    )
    header = ("mode", "clients", "req/s", "p50 ms", "p99 ms", "p99/p99(1)", "CPU ms/req")
    print("{:<13} {:>7} {:>7} {:>8} {:>8} {:>11} {:>11}".format(*header))
    for (mode, clients), (rate, p50, p99, cpu_ms) in results.items():
        ratio = p99 / results[(mode, 1)][2]
        print(f"{mode:<13} {clients:>7} {rate:>7.2f} {p50:>8.1f} {p99:>8.1f} {ratio:>10.2f}x {cpu_ms:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a trained model: runs:/, models:/ or a folder")
    parser.add_argument(
        "--validation", type=Path, default=None, help="dataset for the gate (default: the run's)"
    )
    parser.add_argument(
        "--images", type=Path, default=None, help="folder of JPEGs to time (default: raccoon)"
    )
    parser.add_argument("--count", type=int, default=10, help="images per pass")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per inference (the service's default)"
    )
    parser.add_argument("--requests", type=int, default=48, help="requests per load level")
    parser.add_argument("--concurrency", type=int, default=2, help="the server's --concurrency")
    parser.add_argument("--serve-backends", default="onnx,openvino", help="comma-separated: onnx, openvino")
    parser.add_argument("--no-service", action="store_true", help="part 1 only")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    folder = args.images or RACCOON_IMAGES
    paths = sorted(folder.glob("*.jpg"))[: args.count]
    images = [decode_image_file(path) for path in paths]
    print(f"images: {len(paths)} from {folder}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as root:
        export = bench_models(args, images, Path(root))
        print(f"load average after part 1: {os.getloadavg()[0]:.2f}")
        if not args.no_service:
            for backend in args.serve_backends.split(","):
                bench_service(export, paths[0], args, backend)
                print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
