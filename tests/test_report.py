"""The sweep report, built from a real MLflow store shaped as ``sweep.py`` and ``run_trial`` write it.

The store is made by hand (a parent run, three child runs with params, metric histories, tags and
the real evaluation artifacts of ``write_evaluation`` / ``write_trial_plots``), so every number the
report should show is known; a sweep on Ray would take minutes and hide nothing more from this test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_voc_dataset
from mlflow import MlflowClient
from PIL import Image

from visionautoml.automl.report import build_sweep_report
from visionautoml.config import TrainingParameters
from visionautoml.data.formats import read_dataset
from visionautoml.data.stats import compute_stats
from visionautoml.errors import TrackingError
from visionautoml.training.evaluate import evaluate_predictions, write_evaluation
from visionautoml.training.metrics import ImageDetections, ImageGroundTruth
from visionautoml.training.plots import write_trial_plots

PRIMARY = "mean_average_precision"
HOSTILE = '<script>alert("x")</script>'
VISIONAUTOML = Path(sys.executable).with_name("visionautoml")


class Page(HTMLParser):
    """The parts of a report a test checks: images, tables by id, links, scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.sections: list[str] = []
        self.tags: set[str] = set()
        self.urls: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.add(tag)
        self.urls += [value for key, value in attrs if key in ("src", "href") and value]
        if tag == "img":
            self.images.append(attributes["src"])
        elif tag == "section":
            self.sections.append(attributes["id"])
        elif tag == "table" and attributes.get("id"):
            self._table = attributes["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id: str) -> list[dict[str, str]]:
        header, *rows = self.tables[table_id]
        return [dict(zip(header, row, strict=True)) for row in rows]


def decode_all(images: list[str]) -> list[tuple[int, int]]:
    sizes = []
    for source in images:
        head, _, payload = source.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head[:40]
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.load()
            sizes.append(image.size)
    return sizes


# --- the store ---------------------------------------------------------------------------------------


def log_evaluation(client: MlflowClient, run_id: str, data: Path, folder: Path) -> dict:
    """The trial's real evaluation artifacts, from predictions that find some boxes and miss others."""
    dataset = read_dataset(data)
    classes = list(dataset.classes)
    truths, found = [], []
    for index, image in enumerate(dataset.images):
        boxes = np.array([[b.xmin, b.ymin, b.xmax, b.ymax] for b in image.boxes], float)
        labels = np.array([classes.index(b.label) + 1 for b in image.boxes])
        truths.append(ImageGroundTruth(boxes, labels, np.zeros(len(labels), bool), image.width, image.height))
        keep = slice(0, 1) if index % 2 else slice(None)  # odd images: the second object is missed
        found.append(ImageDetections(boxes[keep] + 1.0, np.full(len(labels[keep]), 0.9), labels[keep]))
    evaluation = evaluate_predictions(truths, found, classes, TrainingParameters(box_score_threshold=0.3))
    write_evaluation(folder, evaluation)
    write_trial_plots(folder / "plots", evaluation, dataset)
    client.log_artifacts(run_id, str(folder), "evaluation")
    return evaluation.metrics


def child(client, experiment_id, parent_id, number, state, status, params, tags, histories):
    run = client.create_run(
        experiment_id,
        run_name=f"trial-abc12_{number - 1:05d}",
        tags={
            "mlflow.parentRunId": parent_id,
            "trial_state": state,
            "tune_trial_id": f"abc12_{number - 1:05d}",
            **tags,
        },
    )
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, points in histories.items():
        for step, value in points:
            client.log_metric(run_id, key, value, step=step)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-store")
    data = make_voc_dataset(root / "data", n_images=6)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("sweep-report", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(
        experiment_id,
        run_name="sweep-20260101-120000",
        tags={
            "visionautoml.kind": "sweep",
            "config_hash": "0123456789abcdef",
            "git_commit": "f" * 40,
            "dataset.training": "sweep-report-train:1",
            "dataset.validation": "sweep-report-validation:1",
        },
    )
    parent_id = parent.info.run_id
    for key, value in {
        "sampling_algorithm": "random",
        "early_termination": "bandit",
        "early_termination.slack_factor": 0.1,
        "max_trials": 3,
        "primary_metric": PRIMARY,
    }.items():
        client.log_param(parent_id, key, value)
    space = [
        {
            "learning_rate": {"type": "uniform", "min_value": 0.001, "max_value": 0.01},
            "optimizer": {"type": "choice", "values": ["sgd", "adam"]},
        }
    ]
    config = {"experiment_name": "sweep-report", "tracking": {"uri": "http://mlflow.example.org"}}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "search_space.json").write_text(json.dumps(space))
        (Path(folder) / "config.yaml").write_text(yaml.safe_dump(config))
        client.log_artifacts(parent_id, folder)

    data_tags = {
        "dataset.training": "sweep-report-train:1",
        "dataset.training.path": str(data),
        "dataset.training.digest": "d" * 64,
        "dataset.validation": "sweep-report-validation:1",
        "dataset.validation.path": str(root / "gone" / "validation_annotations.jsonl"),
        "dataset.validation.digest": "e" * 64,
        "classes": json.dumps(["red_square", "blue_square"]),
    }
    best = child(
        client,
        experiment_id,
        parent_id,
        1,
        "completed",
        "FINISHED",
        {"learning_rate": "0.008", "optimizer": "sgd", "model_name": "ssdlite320_mobilenet_v3_large"},
        {**data_tags, "stop_reason": "number_of_epochs reached", "best_epoch": "3"},
        {PRIMARY: [(1, 0.2), (2, 0.5), (3, 0.61234)], "loss": [(1, 2.0), (2, 1.4), (3, 1.1)]},
    )
    metrics = log_evaluation(client, best, data, root / "evaluation")
    client.log_metric(best, f"best_{PRIMARY}", 0.61234, step=3)
    client.log_metric(best, "best_map_50", 0.7, step=3)
    client.set_terminated(best, "FINISHED")
    second = child(
        client,
        experiment_id,
        parent_id,
        2,
        "completed",
        "FINISHED",
        {"learning_rate": "0.004", "optimizer": "adam", "model_name": "ssdlite320_mobilenet_v3_large"},
        {**data_tags, "stop_reason": "number_of_epochs reached"},
        {PRIMARY: [(1, 0.1), (2, 0.45), (3, 0.4)], "loss": [(1, 2.1), (2, 1.6), (3, 1.5)]},
    )
    client.log_metric(second, f"best_{PRIMARY}", 0.45, step=2)
    client.set_terminated(second, "FINISHED")
    stopped = child(
        client,
        experiment_id,
        parent_id,
        3,
        "early_terminated",
        "KILLED",
        {"learning_rate": "0.0015", "optimizer": "sgd", "model_name": "ssdlite320_mobilenet_v3_large"},
        {**data_tags, "stop_reason": "stopped early by the early-termination policy"},
        {PRIMARY: [(1, 0.05), (2, 0.07)], "loss": [(1, 2.5), (2, 2.4), (3, 2.3)]},
    )
    client.set_terminated(stopped, "KILLED")
    failed = child(
        client,
        experiment_id,
        parent_id,
        4,
        "failed",
        "FAILED",
        {"learning_rate": "0.009", "optimizer": HOSTILE, "model_name": "ssdlite320_mobilenet_v3_large"},
        {"failure_reason": f"diverged {HOSTILE}"},
        {},
    )
    client.set_terminated(failed, "FAILED")
    client.set_tag(parent_id, "best_trial_run_id", best)
    client.set_terminated(parent_id, "FINISHED")
    return {
        "uri": uri,
        "client": client,
        "root": root,
        "data": data,
        "parent": parent_id,
        "metrics": metrics,
        "runs": {"best": best, "second": second, "stopped": stopped, "failed": failed},
    }


@pytest.fixture(scope="module")
def report(store):
    path = build_sweep_report(store["parent"], store["root"] / "out" / "report.html", store["client"])
    text = path.read_text(encoding="utf-8")
    return text, Page(text)


# --- the sweep report ----------------------------------------------------------------------------------


def test_every_image_is_embedded_and_decodes_and_nothing_is_fetched(report):
    text, page = report
    sizes = decode_all(page.images)
    # metric curves, hyperparameters, and the best trial's three diagnostic plots
    assert len(sizes) == 5
    assert all(width > 100 and height > 100 for width, height in sizes)
    assert all(url.startswith(("data:", "#")) for url in page.urls), page.urls
    assert not {"script", "link", "iframe", "object"} & page.tags
    assert "default-src 'none'" in text
    assert page.sections == [
        "summary",
        "leaderboard",
        "curves",
        "hyperparameters",
        "early-termination",
        "best-model",
        "datasets",
        "configuration",
    ]


def test_the_leaderboard_equals_the_tracking_store(report, store):
    _, page = report
    client = store["client"]
    rows = page.rows("leaderboard-table")
    assert [row["trial"] for row in rows] == ["1", "2", "3", "4"]  # completed by score, then the rest
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    for row in rows:
        run = client.get_run(row["run_id"])
        assert row["state"] == run.data.tags["trial_state"]
        assert row["learning_rate"] == run.data.params["learning_rate"]
        history = client.get_metric_history(row["run_id"], PRIMARY)
        best = run.data.metrics.get(f"best_{PRIMARY}", max((m.value for m in history), default=None))
        assert row[PRIMARY] == ("" if best is None else f"{best:.4f}")
        assert row["epochs"] == str(max((m.step for m in history), default=0))
        end, start = run.info.end_time, run.info.start_time
        assert row["seconds"] == f"{(end - start) / 1000:.1f}"
    assert rows[0][PRIMARY] == "0.6123" and rows[1][PRIMARY] == "0.4500" and rows[2][PRIMARY] == "0.0700"
    assert rows[3]["reason"] == f"diverged {HOSTILE}"  # shown as text, not run


def test_stopped_trials_datasets_and_config_are_shown(report, store):
    text, page = report
    (stopped,) = page.rows("early-termination-table")
    assert stopped["trial"] == "3" and stopped["run_id"] == store["runs"]["stopped"]
    assert stopped["stopped after epoch"] == "2"
    assert stopped[f"{PRIMARY} then"] == "0.0700"
    assert stopped["reason"] == "stopped early by the early-termination policy"
    assert "Policy: bandit (slack_factor 0.1)." in text

    training, validation = page.rows("datasets-table")
    stats = compute_stats(read_dataset(store["data"]))
    assert training["version"] == "sweep-report-train:1"
    assert training["images"] == str(stats.image_count) and training["boxes"] == str(stats.box_count)
    assert training["boxes per class"] == ", ".join(f"{k} {v}" for k, v in stats.boxes_per_class.items())
    # the validation path is gone: its counts come from the best trial's metrics.json
    per_class = store["metrics"]["per_class_metrics"]
    assert validation["version"] == "sweep-report-validation:1"
    assert validation["boxes per class"] == ", ".join(
        f"{name} {values['ground_truth_boxes']}" for name, values in per_class.items()
    )

    space = page.rows("search-space-table")
    assert [row["parameter"] for row in space] == ["learning_rate", "optimizer"]
    assert "experiment_name: sweep-report" in text
    assert page.rows("summary-table")[5]["value"] == f"trial 1, run {store['runs']['best']}"


def test_user_strings_are_escaped(report):
    text, page = report
    assert "<script" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "script" not in page.tags


def test_a_single_trial_run_gets_its_config_curves_and_plots(store, tmp_path):
    path = build_sweep_report(store["runs"]["best"], tmp_path / "trial.html", store["client"])
    page = Page(path.read_text(encoding="utf-8"))
    assert page.sections == ["summary", "curves", "plots", "datasets", "configuration"]
    assert len(decode_all(page.images)) == 4  # the curves and the three plots
    parameters = {row["parameter"]: row["value"] for row in page.rows("parameters-table")}
    assert parameters["learning_rate"] == "0.008"
    summary = {row[""]: row["value"] for row in page.rows("summary-table")}
    assert summary[f"best {PRIMARY}"] == "0.6123"


def test_the_report_is_logged_to_the_parent_run_on_request(store, tmp_path):
    client = store["client"]
    path = build_sweep_report(store["parent"], tmp_path / "a.html", client, log_artifact=True)
    logged = client.download_artifacts(store["parent"], "report.html", str(tmp_path / "download"))
    assert Path(logged).read_bytes() == path.read_bytes()


def test_an_unknown_run_is_a_clear_error(store, tmp_path):
    with pytest.raises(TrackingError, match="not in the tracking store"):
        build_sweep_report("0" * 32, tmp_path / "x.html", store["client"])
    with pytest.raises(TrackingError, match="not an MLflow run id"):
        build_sweep_report("x' OR '1'='1", tmp_path / "x.html", store["client"])
    assert not (tmp_path / "x.html").exists()


def test_cli_regenerates_the_report_and_fails_without_traceback(store, tmp_path):
    out = tmp_path / "cli" / "report.html"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    done = subprocess.run(
        [str(VISIONAUTOML), "report", store["parent"], "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(Page(out.read_text(encoding="utf-8")).rows("leaderboard-table")) == 4
    missing = subprocess.run(
        [str(VISIONAUTOML), "report", "0" * 32, "--out", str(tmp_path / "no.html")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 1
    assert "not in the tracking store" in missing.stderr and "Traceback" not in missing.stderr


# --- in a real browser -------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.broken = images.filter((image) => !image.complete || image.naturalWidth === 0).length;
});
</script>"""


def chromium(url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="vaml-chromium-")
    try:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium); "
    "the structural tests above still check the page",
)
def test_chromium_shows_the_report_without_console_errors(report, store, tmp_path):
    text, _ = report
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")
    plain = chromium(page.as_uri(), "--dump-dom")
    assert plain.returncode == 0, plain.stderr[-2000:]
    console = [line for line in plain.stderr.splitlines() if "CONSOLE" in line or "Refused" in line]
    assert not console, console
    assert 'id="leaderboard-table"' in plain.stdout and store["runs"]["best"] in plain.stdout

    # The same page plus a probe (allowed by a loosened policy, in this copy only) that counts the
    # images the browser could not decode: the curves and the drawn predictions must render.
    probed = tmp_path / "probed.html"
    probed.write_text(
        text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';").replace(
            "</body>", IMAGE_CHECK + "</body>"
        ),
        encoding="utf-8",
    )
    dom = chromium(probed.as_uri(), "--dump-dom").stdout
    assert 'data-images="5"' in dom and 'data-broken="0"' in dom, dom[:300]
