"""Everything that talks to MLflow: runs, artifacts, the model registry, dataset and checkpoint copies.

Artifact downloads stream through the tracking server (``mlflow server --serve-artifacts``). MLflow 3
would otherwise fetch them from presigned bucket URLs whenever the server offers them, and a Ray
worker or a CI agent that reaches the tracking server but not the bucket would retry until it gives
up. ``MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=true`` in the environment opts back in.
"""

import os

os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
