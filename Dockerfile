# The image of deploy/kuberay/ (any Ray node, and the CLI): visionautoml with every optional feature,
# installed as scripts/setup.sh installs it (`pip install ".[all]"`, without the dev tools) on Python 3.11.
#
#   docker build -t registry.example.com/visionautoml:0.1.0-cpu .          # the Ray head: CPU torch
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#       -t registry.example.com/visionautoml:0.1.0-gpu .                    # GPU workers: CUDA torch
#
# The GPU variant needs only the NVIDIA driver on the node (and the device plugin on Kubernetes): the
# CUDA runtime comes inside torch's wheels. Both variants hold the same Python, Ray and visionautoml,
# which Ray requires of every node of a cluster. Push them to your registry and name that registry in
# deploy/kuberay/*.yaml. tests/test_kuberay_manifests.py checks what this file and the manifests share.
FROM python:3.11-slim-bookworm

# The torch build: CPU by default; the torch and torchvision versions are pyproject.toml's pins.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The Ray of every node; deploy/kuberay/*.yaml say the same in rayVersion.
ARG RAY_VERSION=2.60.0

# wget: KubeRay's readiness and liveness probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# Ray's images run as uid 1000 with a home folder; KubeRay and Ray's docs assume the same.
RUN useradd --create-home --uid 1000 ray

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv && pip install --upgrade pip

WORKDIR /opt/visionautoml
COPY pyproject.toml README.md ./
# torch first, from the variant's index, so that the project's install below finds its pins satisfied
# and never pulls the other build. A layer of its own: it is most of the image and changes least.
RUN grep -E '^ *"torch(vision)?==' pyproject.toml | tr -d ' ",' > /tmp/torch-pins.txt
RUN test "$(wc -l < /tmp/torch-pins.txt)" -eq 2 \
    && pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch-pins.txt

COPY visionautoml ./visionautoml
RUN pip install ".[all]" "ray[default,tune]==${RAY_VERSION}" \
    && visionautoml --help > /dev/null

USER ray
WORKDIR /home/ray
CMD ["visionautoml", "--help"]
