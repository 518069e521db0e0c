"""The sweep report, built from a real MLflow store shaped as ``sweep.py`` and ``run_trial`` write it.

The store is made by hand (a parent run, three child runs with params, metric histories, tags and
the real evaluation artifacts of ``write_evaluation`` / ``write_trial_plots``), so every number the
report should show is known; a sweep on Ray would take minutes and hide nothing more from this test.
"""

from __future__ import annotations

import base64
import io
import json
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

from visionautoml.cli import main
from visionautoml.config import TrainingParameters
from visionautoml.data.formats import read_dataset
from visionautoml.data.stats import compute_stats
from visionautoml.errors import TrackingError
from visionautoml.evaluation.metrics import ImageDetections, ImageGroundTruth
from visionautoml.evaluation.scoring import evaluate_predictions, write_evaluation
from visionautoml.reports.plots import write_trial_plots
from visionautoml.reports.sweep import build_report, report_after_sweep
from visionautoml.tracking.store import Store

PRIMARY = "mean_average_precision"
HOSTILE = '<script>alert("x")</script>'


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


# (number, trial_state, run status, learning_rate, optimizer, primary metric per epoch, loss per epoch, tags)
TRIALS = [
    (
        1,
        "completed",
        "FINISHED",
        "0.008",
        "sgd",
        None,
        [2.0, 1.4, 1.1],
        {"stop_reason": "number_of_epochs reached"},
    ),
    (2, "completed", "FINISHED", "0.004", "adam", [0.1, 0.45, 0.4], [2.1, 1.6, 1.5], {}),
    (
        3,
        "early_terminated",
        "KILLED",
        "0.0015",
        "sgd",
        [0.05, 0.07],
        [2.5, 2.4, 2.3],
        {"stop_reason": "stopped early by the early-termination policy"},
    ),
    (4, "failed", "FAILED", "0.009", HOSTILE, [], [], {"failure_reason": f"diverged {HOSTILE}"}),
    # trial 2's first run, replaced after an interruption: the report must leave it out
    (2, "interrupted", "KILLED", "0.004", "adam", [0.01], [3.0], {}),
]


LOGGED_COUNTS = {
    "training": {"images": 97, "boxes": 150, "boxes_per_class": {"red_square": 90, "blue_square": 60}},
    "validation": {"images": 24, "boxes": 31, "boxes_per_class": {"red_square": 20, "blue_square": 11}},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-store")
    data = make_voc_dataset(root / "data", n_images=6)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.create_experiment("sweep-report", artifact_location=(root / "artifacts").as_uri())
    parent_tags = {
        "visionautoml.kind": "sweep",
        "git_commit": "f" * 40,
        "dataset.training": "sweep-report-train:1",
        "dataset.validation": "sweep-report-validation:1",
    }
    parent_id = client.create_run(
        experiment_id, run_name="sweep-20260101-120000", tags=parent_tags
    ).info.run_id
    settings = {"sampling_algorithm": "random", "early_termination": "bandit", "primary_metric": PRIMARY}
    for key, value in {**settings, "early_termination.slack_factor": 0.1}.items():
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
        "dataset.training.path": str(data),
        "dataset.training.digest": "d" * 64,
        "dataset.validation.path": str(root / "gone" / "validation_annotations.jsonl"),
        "dataset.validation.digest": "e" * 64,
        "classes": json.dumps(["red_square", "blue_square"]),
    }
    runs, metrics = {}, {}
    for number, state, status, learning_rate, optimizer, curve, losses, tags in TRIALS:
        trial_id = f"abc12_{number - 1:05d}"
        tags = {"mlflow.parentRunId": parent_id, "trial_state": state, "tune_trial_id": trial_id, **tags}
        if state != "failed":  # this one failed before it read any data
            tags.update(data_tags)
        run_id = client.create_run(experiment_id, run_name=f"trial-{trial_id}", tags=tags).info.run_id
        client.log_param(run_id, "learning_rate", learning_rate)
        client.log_param(run_id, "optimizer", optimizer)
        if curve is None:  # the best trial: its real evaluation, improving up to it
            metrics = log_evaluation(client, run_id, data, root / "evaluation")
            curve = [metrics[PRIMARY] * fraction for fraction in (0.3, 0.8, 1.0)]
        for epoch, value in enumerate(curve, start=1):
            client.log_metric(run_id, PRIMARY, value, step=epoch)
        for epoch, value in enumerate(losses, start=1):
            client.log_metric(run_id, "loss", value, step=epoch)
        if state == "completed":
            client.log_metric(run_id, f"best_{PRIMARY}", max(curve), step=curve.index(max(curve)) + 1)
        if (number, state) == (2, "completed"):  # what run_trial logs: the counts, readable anywhere
            client.log_dict(run_id, LOGGED_COUNTS, "data/datasets.json")
        client.set_terminated(run_id, status)
        runs.setdefault(number, run_id)
    client.log_metric(runs[1], "best_map_50", metrics["map_50"])
    client.set_tag(parent_id, "best_trial_run_id", runs[1])
    client.set_terminated(parent_id, "FINISHED")
    return {
        "client": client,
        "store": Store(f"sqlite:///{root / 'mlflow.db'}"),
        "root": root,
        "data": data,
        "parent": parent_id,
        "metrics": metrics,
        "runs": runs,
    }


@pytest.fixture(scope="module")
def report(store):
    path = build_report(store["parent"], store["root"] / "out" / "report.html", store["store"])
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
    assert [row[PRIMARY] for row in rows] == [f"{store['metrics'][PRIMARY]:.4f}", "0.4500", "0.0700", ""]
    assert rows[3]["reason"] == f"diverged {HOSTILE}"  # shown as text, not run


def test_stopped_trials_datasets_and_config_are_shown(report, store):
    text, page = report
    (stopped,) = page.rows("early-termination-table")
    assert stopped["trial"] == "3" and stopped["run_id"] == store["runs"][3]
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
    summary = {row["field"]: row["value"] for row in page.rows("summary-table")}
    assert summary["best trial"] == f"trial 1, run {store['runs'][1]}"
    assert summary["trials"] == "4: 2 completed, 1 early_terminated, 1 failed"


def test_user_strings_are_escaped(report):
    text, page = report
    assert "<script" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "script" not in page.tags


def test_a_single_trial_run_gets_its_config_curves_and_plots(store, tmp_path):
    path = build_report(store["runs"][1], tmp_path / "trial.html", store["store"])
    page = Page(path.read_text(encoding="utf-8"))
    assert page.sections == ["summary", "curves", "plots", "datasets", "configuration"]
    assert len(decode_all(page.images)) == 4  # the curves and the three plots
    parameters = {row["parameter"]: row["value"] for row in page.rows("parameters-table")}
    assert parameters["learning_rate"] == "0.008"
    summary = {row["field"]: row["value"] for row in page.rows("summary-table")}
    assert summary[f"best {PRIMARY}"] == f"{store['metrics'][PRIMARY]:.4f}"


def test_dataset_counts_logged_by_the_trial_are_shown_without_the_data(store, tmp_path):
    path = build_report(store["runs"][2], tmp_path / "trial.html", store["store"])
    training, validation = Page(path.read_text(encoding="utf-8")).rows("datasets-table")
    for row, logged in ((training, LOGGED_COUNTS["training"]), (validation, LOGGED_COUNTS["validation"])):
        assert row["images"] == str(logged["images"]) and row["boxes"] == str(logged["boxes"])
        assert row["boxes per class"] == ", ".join(f"{k} {v}" for k, v in logged["boxes_per_class"].items())
        assert row["counts"] == "logged by trial 2"


def test_after_a_sweep_the_report_is_logged_to_the_parent_run_and_never_fails_it(
    store, tmp_path, monkeypatch, caplog
):
    client = store["client"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(client.tracking_uri))
    path = report_after_sweep(store["parent"], tmp_path / "sweeps" / "report.html")
    logged = client.download_artifacts(store["parent"], "report.html", str(tmp_path / "download"))
    assert Path(logged).read_bytes() == path.read_bytes()

    assert report_after_sweep("0" * 32, tmp_path / "none.html") is None
    assert "could not write the sweep report" in caplog.text and not (tmp_path / "none.html").exists()


def test_an_unknown_run_is_a_clear_error(store, tmp_path):
    with pytest.raises(TrackingError, match="not in the tracking store"):
        build_report("0" * 32, tmp_path / "x.html", store["store"])
    with pytest.raises(TrackingError, match="not an MLflow run id"):
        build_report("x' OR '1'='1", tmp_path / "x.html", store["store"])
    assert not (tmp_path / "x.html").exists()


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The console script's ``main`` in this process: exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["visionautoml", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_cli_regenerates_the_report_and_fails_without_traceback(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli" / "report.html"
    uri = str(store["client"].tracking_uri)
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "report", store["parent"], "--out", str(out), "--tracking-uri", uri
    )
    assert code == 0, stderr
    assert str(out) in stdout
    assert len(Page(out.read_text(encoding="utf-8")).rows("leaderboard-table")) == 4

    code, _, stderr = run_cli(
        monkeypatch, capsys, "report", "0" * 32, "-o", str(tmp_path / "no.html"), "--tracking-uri", uri
    )
    assert code == 1 and "not in the tracking store" in stderr and "Traceback" not in stderr
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, stderr = run_cli(
        monkeypatch, capsys, "report", store["parent"], "-o", str(out), "-w", str(tmp_path / "empty")
    )
    assert code == 1 and "no MLflow store there" in stderr
    assert not (tmp_path / "no.html").exists()


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
    assert 'id="leaderboard-table"' in plain.stdout and store["runs"][1] in plain.stdout

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
