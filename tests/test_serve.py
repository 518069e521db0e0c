"""The scoring service, as a real uvicorn server started by `visionautoml serve` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException
from PIL import Image

from visionautoml.data.images import decode_image_bytes
from visionautoml.deploy.runtime import OnnxPredictor
from visionautoml.deploy.serve import ServeSettings, _InferencePool
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(deploy_model, deploy_registry, tmp_path_factory) -> Iterator[Server]:
    tracking_uri, model_uri = deploy_registry
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    env = {**os.environ, "VISIONAUTOML_API_KEY": API_KEY, "MLFLOW_TRACKING_URI": tracking_uri}
    command = [
        sys.executable,
        "-m",
        "visionautoml.cli",
        "serve",
        model_uri,
        "--onnx",
        str(deploy_model.export),
    ]
    command += ["--port", str(port), "--max-body-mb", "0.25", "--max-images", "3", "--max-pixels", "1000000"]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    running = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(running.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def images(deploy_model) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path in sorted((deploy_model.data / "images").glob("*.jpg"))]


def assert_same_boxes(actual: list[dict], expected: list[dict], tolerance: float = 2e-4) -> None:
    """Matched rather than compared by rank: detections with equal scores may come out in either order."""
    assert len(actual) == len(expected)
    for item in expected:
        assert any(
            other["label"] == item["label"]
            and abs(other["score"] - item["score"]) <= tolerance
            and all(abs(other["box"][key] - value) <= tolerance for key, value in item["box"].items())
            for other in actual
        ), item


def test_probes_and_docs_are_open(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "backend": "onnx"}
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    score = httpx.get(server.url + "/openapi.json").json()["paths"]["/score"]["post"]
    assert set(score["requestBody"]["content"]) == {"multipart/form-data", "application/json"}


def test_metadata_names_the_registered_version_and_needs_the_key(server):
    assert httpx.get(server.url + "/metadata").status_code == 401
    metadata = httpx.get(server.url + "/metadata", headers=KEY).json()
    assert metadata["model_name"] == "ssdlite320_mobilenet_v3_large"
    assert (metadata["registered_model"], metadata["version"]) == ("deploy-tiny", "1")
    assert metadata["backend"] == "onnx"
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


def test_inference_pool_times_out_and_sheds_load():
    async def scenario() -> None:
        pool = _InferencePool(ServeSettings(concurrency=1, queue=0, timeout_s=0.2))
        release = threading.Event()
        first = asyncio.ensure_future(pool.run(release.wait))
        await asyncio.sleep(0.05)
        with pytest.raises(HTTPException) as busy:
            await pool.run(lambda: "never runs")
        assert busy.value.status_code == 503
        with pytest.raises(HTTPException) as late:
            await first
        assert late.value.status_code == 504 and "longer than 0.2 s" in late.value.detail
        release.set()
        for _ in range(100):
            try:
                assert await pool.run(lambda: "answered") == "answered"
                break
            except HTTPException:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the pool did not take work again after the blocked inference finished")
        pool.shutdown()

    asyncio.run(scenario())
