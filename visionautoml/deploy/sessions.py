"""Inference sessions on an ONNX file: ONNX Runtime, or OpenVINO reading the same file.

Both expose ONNX Runtime's ``run(None, feeds) -> [arrays in the graph's output order]``, so
the predictor, the parity check and the accuracy gate do not care which runtime scores.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from visionautoml.errors import DataError, first_line

Runtime = Literal["onnxruntime", "openvino"]


def default_threads() -> int:
    """Cores this process may use (the affinity mask, not the machine's count, inside containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def make_session(path: Path, *, intra_op_threads: int | None = None, runtime: Runtime = "onnxruntime") -> Any:
    """A CPU session on ``path``; one session serves concurrent ``run`` calls safely."""
    if runtime == "openvino":
        return OpenVinoSession(path, threads=intra_op_threads or default_threads())
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle ONNX Runtime threads otherwise spin for a while after each run, taking cores from the
    # request threads and from everything else on the machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise DataError(f"{path}: ONNX Runtime cannot load it ({error}); export the model again") from None


class OpenVinoSession:
    """OpenVINO's CPU plugin on an ONNX file, behind ONNX Runtime's ``run`` interface.

    A compiled model is shared; an infer request is not thread-safe, so each thread gets its own.
    """

    def __init__(self, path: Path, *, threads: int) -> None:
        try:
            import openvino
        except ImportError:
            raise DataError(
                "the openvino backend needs OpenVINO: pip install 'visionautoml[openvino]' "
                "(or use --backend onnx)"
            ) from None
        core = openvino.Core()
        try:
            model = core.read_model(str(path))
            self._compiled = core.compile_model(
                model,
                "CPU",
                {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1},
            )
        except Exception as error:
            raise DataError(
                f"{path}: OpenVINO cannot load it ({first_line(error)}); use --backend onnx"
            ) from None
        self._outputs = list(self._compiled.outputs)
        self._local = threading.local()

    def run(self, _names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(feeds)
        return [np.array(results[output]) for output in self._outputs]
