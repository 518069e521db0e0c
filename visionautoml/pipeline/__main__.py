"""The pipeline's worker processes, started by the pipeline itself, never by hand.

``python -m visionautoml.pipeline detached WORKSPACE RUN_ID`` runs a recorded run in the
background (``pipeline run --detach`` on this machine); ``python -m visionautoml.pipeline
ray-job CONFIG [--data DATA]`` is the entrypoint of the Ray job that ``--detach`` submits to
a cluster, and prints the outcome as its last line for ``runs wait`` to read. Arguments carry
no secret: a detached process inherits the environment, a Ray job gets it as its runtime env.
"""

from __future__ import annotations

import argparse
import json
import sys

from visionautoml.errors import VisionAutoMLError
from visionautoml.redact import masked_output


def detached(workspace: str, run_id: str) -> int:
    """Run the recorded request; exit 0 only if the pipeline succeeded."""
    from visionautoml.pipeline.jobs import load_run
    from visionautoml.pipeline.run import run_recorded

    record = load_run(workspace, run_id)
    try:
        run_recorded(record)
    except VisionAutoMLError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def ray_job(config: str, data: str | None, settings: list[str]) -> int:
    """Run the pipeline in the foreground on the cluster, then print its outcome as JSON."""
    from visionautoml.pipeline.ray_jobs import RESULT_MARKER
    from visionautoml.pipeline.run import run_pipeline

    with masked_output():
        try:
            result = run_pipeline(config, data=data, settings=settings).to_dict()
        except VisionAutoMLError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            result = {"status": "failed", "error": str(error)}
        print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
    return 0 if result.get("status") == "succeeded" else 1


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m visionautoml.pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    detached_parser = commands.add_parser("detached", help="run a recorded pipeline run in the background")
    detached_parser.add_argument("workspace")
    detached_parser.add_argument("run_id")
    job_parser = commands.add_parser("ray-job", help="the entrypoint of a pipeline submitted as a Ray job")
    job_parser.add_argument("config")
    job_parser.add_argument("--data")
    job_parser.add_argument("--set", dest="settings", action="append", default=[])
    options = parser.parse_args(arguments)
    if options.command == "detached":
        return detached(options.workspace, options.run_id)
    return ray_job(options.config, options.data, options.settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
