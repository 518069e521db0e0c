"""The scoring service's ``/metrics``, in Prometheus' text exposition format (version 0.0.4).

Written here rather than with ``prometheus_client``: five series do not need a dependency,
and a registry per app (not one per process) keeps tests and several apps in one process
apart. Each worker process counts its own requests; with ``--workers N`` a scrape sees the
worker that answered it, so scrape each worker or sum in Prometheus as usual.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {cumulative}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {cumulative}"]
        return out


class ServiceMetrics:
    """Counters and histograms of one app; safe to update from the event loop and inference threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._latency: dict[str, _Histogram] = {}
        self._batches = _Histogram(BATCH_BUCKETS)
        self._inference = _Histogram(LATENCY_BUCKETS)
        self._images = 0
        self._in_flight = 0

    def request_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def request_finished(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self._in_flight -= 1
            key = (method, endpoint, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch_done(self, images: int, seconds: float) -> None:
        with self._lock:
            self._batches.observe(images)
            self._inference.observe(seconds)
            self._images += images

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP visionautoml_requests_total HTTP requests answered, by endpoint and status code.",
                "# TYPE visionautoml_requests_total counter",
            ]
            for (method, endpoint, status), count in sorted(self._requests.items()):
                lines.append(
                    f'visionautoml_requests_total{{method="{method}",endpoint="{endpoint}",'
                    f'status="{status}"}} {count}'
                )
            lines += [
                "# HELP visionautoml_request_errors_total Requests answered with a 4xx or 5xx status.",
                "# TYPE visionautoml_request_errors_total counter",
            ]
            errors: dict[tuple[str, int], int] = {}
            for (_, endpoint, status), count in self._requests.items():
                if status >= 400:
                    errors[(endpoint, status)] = errors.get((endpoint, status), 0) + count
            for (endpoint, status), count in sorted(errors.items()):
                lines.append(
                    f'visionautoml_request_errors_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                )
            lines += [
                "# HELP visionautoml_request_duration_seconds Time from request to response.",
                "# TYPE visionautoml_request_duration_seconds histogram",
            ]
            for endpoint, histogram in sorted(self._latency.items()):
                lines += histogram.lines("visionautoml_request_duration_seconds", f'endpoint="{endpoint}"')
            lines += [
                "# HELP visionautoml_batch_size Images per inference call (requests gathered into a batch).",
                "# TYPE visionautoml_batch_size histogram",
                *self._batches.lines("visionautoml_batch_size"),
                "# HELP visionautoml_inference_duration_seconds Time of one inference call.",
                "# TYPE visionautoml_inference_duration_seconds histogram",
                *self._inference.lines("visionautoml_inference_duration_seconds"),
                "# HELP visionautoml_images_total Images scored.",
                "# TYPE visionautoml_images_total counter",
                f"visionautoml_images_total {self._images}",
                "# HELP visionautoml_requests_in_flight Requests being read, decoded, queued or scored.",
                "# TYPE visionautoml_requests_in_flight gauge",
                f"visionautoml_requests_in_flight {self._in_flight}",
            ]
        return "\n".join(lines) + "\n"
