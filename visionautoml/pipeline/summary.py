"""What a pipeline run leaves for people and CI: the output JSON and the job summary in Markdown.

Both are masked when written: the result may quote a URL or an error that held a secret.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from visionautoml.automl.leaderboard import markdown_table
from visionautoml.pipeline import jobs
from visionautoml.pipeline.jobs import RunRecord
from visionautoml.redact import write_masked_text

if TYPE_CHECKING:
    from visionautoml.pipeline.run import PipelineResult

SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"


def summary_markdown(result: PipelineResult) -> str:
    """The Markdown a CI job shows: outcome, steps, data versions, leaderboard, registered model."""
    outcome = "succeeded" if result.status == jobs.SUCCEEDED else "failed"
    lines = [f"## visionautoml pipeline `{result.pipeline_run_id}` {outcome}", ""]
    if result.error:
        lines += [f"**Error:** {result.error}", ""]
    steps = [{**step, "seconds": f"{step['seconds']:.1f}"} for step in result.steps]
    lines.append(markdown_table(["step", "status", "seconds", "detail"], steps).rstrip())
    if result.datasets:
        rows = [
            {
                "dataset": role,
                "version": f"`{version['ref']}`",
                "images": version["image_count"],
                "boxes": version["box_count"],
                "new": "no (reused)" if version.get("reused") else "yes",
            }
            for role, version in result.datasets.items()
        ]
        lines += ["", "### Data", "", markdown_table(list(rows[0]), rows).rstrip()]
    if result.leaderboard_markdown:
        lines += ["", "### Leaderboard", "", result.leaderboard_markdown]
    if result.registered_model:
        model = result.registered_model
        lines += ["", "### Registered model", "", f"`{model['name']}` version {model['version']}"]
        lines[-1] += f" (aliases: {', '.join(model.get('aliases') or []) or 'none'})"
        if result.reused_training:
            lines[-1] += ", from an earlier run of the same config on the same data"
        if result.promotion:
            lines += ["", result.promotion["message"]]
    return "\n".join(lines) + "\n"


def write_outputs(record: RunRecord, result: PipelineResult) -> None:
    if record.output_json:
        write_masked_text(record.output_json, json.dumps(result.to_dict(), indent=2) + "\n")
    summary = os.environ.get(SUMMARY_VARIABLE)
    if summary:
        path = Path(summary)
        before = path.read_text(encoding="utf-8") if path.is_file() else ""
        write_masked_text(path, before + summary_markdown(result))
