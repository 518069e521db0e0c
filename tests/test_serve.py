"""The scoring service, as a real uvicorn server started by `visionautoml serve` on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
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
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from visionautoml.data.images import decode_image_bytes
from visionautoml.deploy.runtime import OnnxPredictor
from visionautoml.models.predictor import automl_boxes

pytestmark = pytest.mark.slow
API_KEY = "test-key-5f1c"
KEY = {"x-api-key": API_KEY}
CLASSES = {"blue_square", "red_square"}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def post(self, path: str = "/score", **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def workers(self) -> list[int]:
        """PIDs of the worker processes the supervisor (our `serve` process) spawned."""
        found = []
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                try:
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        found.append(int(pid))
                except FileNotFoundError:
                    continue
        return sorted(found)

    def wait_until_healthy(self, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert self.process.poll() is None, f"the server exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not answer:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(arguments: list[str], log: Path, env: dict[str, str]) -> Iterator[Server]:
    """`visionautoml serve ARGUMENTS` until the test module is done; its workers are stopped too, by PID."""
    port = free_port()
    command = [sys.executable, "-m", "visionautoml.cli", "serve", *arguments, "--port", str(port)]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    running = Server(f"http://127.0.0.1:{port}", process, log)
    workers: list[int] = []
    try:
        running.wait_until_healthy()
        yield running
    finally:
        workers = running.workers() if process.poll() is None else []
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid in workers:  # the supervisor stops them; one left over (it was killed hard) is stopped here
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(deploy_model, deploy_registry, tmp_path_factory) -> Iterator[Server]:
    tracking_uri, model_uri = deploy_registry
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "VISIONAUTOML_API_KEY": API_KEY, "MLFLOW_TRACKING_URI": tracking_uri}
    arguments = [model_uri, "--onnx", str(deploy_model.export), "--max-body-mb", "0.25", "--max-images", "3"]
    arguments += ["--max-pixels", "1000000", "--max-request-pixels", "2000000"]
    yield from start_server(arguments, log, env)


@pytest.fixture(scope="module")
def open_server(deploy_model, tmp_path_factory) -> Iterator[Server]:
    """No API key, docs public, one inference thread that gathers requests for up to 2 s."""
    log = tmp_path_factory.mktemp("serve-open") / "server.log"
    env = {key: value for key, value in os.environ.items() if key != "VISIONAUTOML_API_KEY"}
    arguments = [str(deploy_model.export), "--public-docs", "--concurrency", "1", "--max-batch", "4"]
    arguments += ["--batch-wait", "2s"]
    yield from start_server(arguments, log, env)


@pytest.fixture(scope="module")
def images(deploy_model) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path in sorted((deploy_model.data / "images").glob("*.jpg"))]


def assert_same_boxes(actual: list[dict], expected: list[dict], tolerance: float = 2e-4) -> None:
    """Matched rather than compared by rank: detections with equal scores may come out in either order.

    The test model is barely trained and scores many boxes alike, so which of them make the 100-box
    cut can differ between backends by a rounding (it does on some CPUs): nearly all must match.
    """
    assert len(actual) == len(expected)
    missed = [
        item
        for item in expected
        if not any(
            other["label"] == item["label"]
            and abs(other["score"] - item["score"]) <= tolerance
            and all(abs(other["box"][key] - value) <= tolerance for key, value in item["box"].items())
            for other in actual
        )
    ]
    assert len(missed) <= 0.05 * len(expected), missed


def test_probes_are_open_and_the_docs_need_the_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "backend": "onnx"}
    for path in ("/docs", "/openapi.json", "/metrics", "/redoc"):
        assert httpx.get(server.url + path).status_code in (401, 404), path
    assert httpx.get(server.url + "/docs").status_code == 401
    docs = httpx.get(server.url + "/docs", headers=KEY)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = httpx.get(server.url + "/openapi.json", headers=KEY).json()
    score = schema["paths"]["/score"]["post"]
    assert set(score["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert "/docs" not in schema["paths"] and "/metrics" in schema["paths"]


def test_public_docs_open_the_docs_only(open_server):
    assert httpx.get(open_server.url + "/docs").status_code == 200
    assert "/score" in httpx.get(open_server.url + "/openapi.json").json()["paths"]


def test_metadata_names_the_registered_version_and_needs_the_key(server):
    assert httpx.get(server.url + "/metadata").status_code == 401
    metadata = httpx.get(server.url + "/metadata", headers=KEY).json()
    assert metadata["model_name"] == "ssdlite320_mobilenet_v3_large"
    assert (metadata["registered_model"], metadata["version"]) == ("deploy-tiny", "1")
    assert metadata["backend"] == "onnx" and metadata["precision"] == "fp32"
    assert metadata["labels"] == ["blue_square", "red_square"]
    assert metadata["thresholds"] == {
        "box_score_threshold": 0.05,
        "nms_iou_threshold": 0.5,
        "box_detections_per_image": 100,
    }


def test_one_upload_is_answered_in_the_cloud_format(server, images, deploy_model):
    name, data = images[0]
    response = server.post(files={"file": (name, data, "image/jpeg")}, headers=KEY)
    assert response.status_code == 200, response.text
    [result] = response.json()
    assert result["filename"] == name
    assert result["boxes"]
    for item in result["boxes"]:
        assert set(item) == {"box", "label", "score"} and item["label"] in CLASSES
        box = item["box"]
        assert 0 <= box["topX"] <= box["bottomX"] <= 1 and 0 <= box["topY"] <= box["bottomY"] <= 1
        assert item["score"] >= 0.05
    pixels = decode_image_bytes(data)
    [detections] = OnnxPredictor(deploy_model.export, intra_op_threads=1).predict([pixels])
    assert_same_boxes(result["boxes"], automl_boxes(detections, pixels.shape[2], pixels.shape[1]))


def test_a_batch_and_the_base64_json_form_give_the_same_answers(server, images):
    singles = [
        server.post(files={"file": (n, d, "image/jpeg")}, headers=KEY).json()[0] for n, d in images[:2]
    ]
    batch = server.post(files=[("files", (n, d, "image/jpeg")) for n, d in images[:2]], headers=KEY)
    assert batch.status_code == 200, batch.text
    assert [result["filename"] for result in batch.json()] == [name for name, _ in images[:2]]
    # The cloud client sends base64.encodebytes (with line breaks); pandas' split form sends [value] rows.
    rows = [base64.encodebytes(images[0][1]).decode(), [base64.b64encode(images[1][1]).decode()]]
    body = {"input_data": {"columns": ["image"], "data": rows}}
    as_json = server.post(json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert as_json.status_code == 200, as_json.text
    assert [result["filename"] for result in as_json.json()] == ["data[0]", "data[1]"]
    for single, from_batch, from_json in zip(singles, batch.json(), as_json.json(), strict=True):
        assert_same_boxes(from_batch["boxes"], single["boxes"])
        assert_same_boxes(from_json["boxes"], single["boxes"])


def test_the_api_key_is_required_when_set(server, images):
    files = {"file": images[0]}
    for headers in (
        {},
        {"x-api-key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic eDp5"},
    ):
        response = server.post(files=files, headers=headers)
        assert response.status_code == 401, headers
        assert "API key" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert server.post(files=files, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_with_too_little_data() -> bytes:
    """Issue 11's 69 bytes: a valid IHDR for 10x10 RGB, an IDAT of 100 zero bytes compressed, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    return data + chunk(b"IEND", b"")


def test_bad_input_gets_a_4xx_with_a_message_and_the_server_stays_up(server, images):
    name, data = images[0]
    chunk = b"x" * 65536
    cases = [
        ("a text file", 415, "not an image", {"files": {"file": ("notes.jpg", b"hello, not a picture\n")}}),
        (
            "a truncated JPEG",
            422,
            "cannot decode",
            {"files": {"file": ("cut.jpg", data[: len(data) * 3 // 5])}},
        ),
        ("bad base64", 422, "not valid base64", {"json": {"input_data": {"data": ["@@not base64@@"]}}}),
        ("the wrong JSON", 422, "input_data", {"json": {"inputs": [1, 2]}}),
        (
            "invalid JSON",
            422,
            "not valid JSON",
            {"content": b"{", "headers": {"content-type": "application/json"}},
        ),
        (
            "a text body",
            415,
            "multipart/form-data",
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
        ),
        ("no file field", 422, "no multipart field", {"files": {"other": ("x.jpg", data)}}),
        (
            "a text value as file",
            422,
            "must be a file upload",
            {"data": {"file": "abc"}, "files": {"x": ("x", b"")}},
        ),
        ("four images", 413, "the limit is 3", {"files": [("files", (name, data))] * 4}),
        (
            "a decompression bomb",
            413,
            "pixels is over the limit",
            {"files": {"file": ("bomb.png", png(2000, 2000))}},
        ),
        (
            "too many pixels together",
            413,
            "over the limit of 2,000,000 per request",
            {"files": [("files", (f"{n}.png", png(1000, 1000))) for n in range(3)]},
        ),
        ("a large body", 413, "bytes; the limit is", {"files": {"file": ("big.jpg", b"\xff" * 300_000)}}),
        ("a large stream", 413, "larger than the limit", {"content": iter([chunk] * 6), "headers": KEY}),
    ]
    for what, status, message, request in cases:
        request = {**request, "headers": {**KEY, **request.get("headers", {})}}
        response = server.post(**request)
        assert response.status_code == status, (what, response.text)
        assert message in response.json()["detail"], what
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.post(files={"file": (name, data)}, headers=KEY).status_code == 200
    assert server.process.poll() is None


def test_the_69_byte_png_is_a_4xx_and_the_same_worker_answers_on(server, images):
    data = png_with_too_little_data()
    assert len(data) == 69
    workers = server.workers()
    assert len(workers) == 1
    for request in (
        {"files": {"file": ("short.png", data, "image/png")}},
        {"json": {"input_data": {"data": [base64.b64encode(data).decode()]}}},
    ):
        response = server.post(headers=KEY, **request)
        assert response.status_code == 422, response.text
        assert "cannot decode" in response.json()["detail"]
        assert httpx.get(server.url + "/health").status_code == 200
    assert server.workers() == workers  # not restarted: the worker never went down
    name, jpeg = images[0]
    assert server.post(files={"file": (name, jpeg)}, headers=KEY).status_code == 200


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 if absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    found = [float(match.group(1)) for match in re.finditer(pattern, text, re.MULTILINE)]
    return found[0] if found else 0.0


def test_metrics_count_requests_errors_latency_and_batches(server, images):
    before = httpx.get(server.url + "/metrics", headers=KEY)
    assert before.status_code == 200 and before.headers["content-type"].startswith(
        "text/plain; version=0.0.4"
    )
    name, data = images[0]
    server.post(files={"file": (name, data)}, headers=KEY)
    server.post(files={"file": ("notes.jpg", b"not a picture")}, headers=KEY)
    server.post(files={"file": (name, data)})
    text = httpx.get(server.url + "/metrics", headers=KEY).text
    ok = {"method": "POST", "endpoint": "/score", "status": "200"}
    assert (
        metric(text, "visionautoml_requests_total", **ok)
        == metric(before.text, "visionautoml_requests_total", **ok) + 1
    )
    for status in ("415", "401"):
        labels = {"endpoint": "/score", "status": status}
        assert metric(text, "visionautoml_request_errors_total", **labels) >= 1, status
    count = metric(text, "visionautoml_request_duration_seconds_count", endpoint="/score")
    assert count >= 3 and metric(text, "visionautoml_request_duration_seconds_sum", endpoint="/score") > 0
    assert metric(text, "visionautoml_request_duration_seconds_bucket", endpoint="/score", le="+Inf") == count
    assert (
        metric(text, "visionautoml_batch_size_count") >= 1 and metric(text, "visionautoml_images_total") >= 1
    )
    assert "# TYPE visionautoml_batch_size histogram" in text


def test_concurrent_requests_are_gathered_into_one_inference_call(open_server, images):
    def score(index: int) -> list[dict]:
        name, data = images[index]
        response = open_server.post(files={"file": (name, data)})
        assert response.status_code == 200, response.text
        return response.json()[0]["boxes"]

    alone = [score(index) for index in range(4)]
    # The batcher waits only for requests already being decoded, so on a loaded machine four client
    # threads can reach it one by one; a few bursts give them the chance to overlap. A batcher that
    # never gathers fails every burst.
    bursts = []
    for _ in range(5):
        before = httpx.get(open_server.url + "/metrics").text
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(score, range(4)))
        after = httpx.get(open_server.url + "/metrics").text
        calls = metric(after, "visionautoml_batch_size_count") - metric(
            before, "visionautoml_batch_size_count"
        )
        scored = metric(after, "visionautoml_batch_size_sum") - metric(before, "visionautoml_batch_size_sum")
        assert scored == 4
        for batched, single in zip(together, alone, strict=True):
            assert_same_boxes(batched, single)
        bursts.append(calls)
        if calls < 4:
            break
    assert min(bursts) < 4, f"inference calls per burst of 4 requests: {bursts}"  # one thread, gathered
    # Alone, a request does not wait out the 2 s window: nothing else was on its way.
    started = time.monotonic()
    score(0)
    assert time.monotonic() - started < 2


def test_a_killed_worker_is_replaced_and_the_service_answers_again(open_server, images):
    [worker] = open_server.workers()
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 240
    while not (open_server.workers() and open_server.workers() != [worker]):
        assert time.monotonic() < deadline, open_server.log.read_text()[-3000:]
        time.sleep(0.2)
    open_server.wait_until_healthy()
    name, data = images[0]
    assert open_server.post(files={"file": (name, data)}).status_code == 200
    assert open_server.process.poll() is None
    assert "died" in open_server.log.read_text()


def test_concurrent_requests_are_all_answered(server, images):
    def score(index: int) -> list[dict]:
        name, data = images[index % len(images)]
        response = server.post(files={"file": (name, data)}, headers=KEY)
        assert response.status_code == 200, response.text
        return response.json()[0]["boxes"]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(score, range(6)))
    for index in range(len(images), 6):
        assert_same_boxes(answers[index], answers[index % len(images)])


def test_schemathesis_finds_no_server_error(server, tmp_path):
    command = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json"]
    command += ["--checks", "not_a_server_error", "--header", f"x-api-key: {API_KEY}", "--max-examples", "20"]
    command += ["--workers", "1", "--seed", "7", "--no-color", "--warnings", "off"]
    command += ["--generation-database", "none", "--report-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "No issues found" in result.stdout
    assert server.process.poll() is None


def test_pyfunc_of_the_registered_model_answers_like_the_service(server, images, deploy_registry):
    tracking_uri, model_uri = deploy_registry
    script = (
        "import base64, json, sys\n"
        "import mlflow, pandas\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "model = mlflow.pyfunc.load_model(sys.argv[2])\n"
        "encoded = [base64.b64encode(open(path, 'rb').read()).decode() for path in sys.argv[3:]]\n"
        "frame = pandas.DataFrame({'image': encoded})\n"
        "print(json.dumps(model.predict(frame).to_dict(orient='records')))\n"
    )
    paths = [str(Path(server.log).parent / name) for name, _ in images[:2]]
    for path, (_, data) in zip(paths, images[:2], strict=True):
        Path(path).write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-c", script, tracking_uri, model_uri, *paths],
        capture_output=True,
        text=True,
        timeout=300,
        env={key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from_pyfunc = json.loads(result.stdout.strip().splitlines()[-1])
    served = server.post(files=[("files", image) for image in images[:2]], headers=KEY).json()
    assert len(from_pyfunc) == 2
    for row, answer in zip(from_pyfunc, served, strict=True):
        assert_same_boxes(row["boxes"], answer["boxes"])


def test_a_model_that_does_not_load_stops_the_service_instead_of_restarting_it(deploy_model, tmp_path):
    broken = shutil.copytree(deploy_model.export, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not a graph")
    command = [sys.executable, "-m", "visionautoml.cli", "serve", str(broken), "--port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1
    assert "ONNX Runtime cannot load it" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("Started parent process") == 1 and "died" not in result.stderr
