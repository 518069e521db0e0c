"""Parity: does a graph predict the boxes its reference predicts (PyTorch, or the one-image graph)?

The check compares detections, not tensors: each of the reference's top detections must have
a counterpart with the same label and score whose box is within ``tolerance_px``. That is
what a user sees, and it survives the two legitimate differences between runtimes: float
rounding, and the order of equal scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

PARITY_TOLERANCE_PX = 0.01
PARITY_TOP_K = 10
# Scores of matching detections differ by float rounding only; a larger gap means another box.
_SCORE_TOLERANCE = 1e-4

Outputs = dict[str, np.ndarray]
"""One image's raw detections: ``boxes`` (N, 4) pixels, ``scores`` (N,), ``labels`` (N,)."""


@dataclass(frozen=True, slots=True)
class ParityReport:
    """A graph against its reference on the same images: the top detections must be the same boxes."""

    images: int
    compared: int
    unmatched: int
    max_box_diff_px: float
    max_score_diff: float
    count_differences: int
    tolerance_px: float
    sample_source: str
    scope: str = "all"
    reference: str = "PyTorch"

    @property
    def passed(self) -> bool:
        return self.compared > 0 and self.unmatched == 0 and self.max_box_diff_px <= self.tolerance_px

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict}: {self.compared} top detections ({self.scope}) on {self.images} "
            f"{self.sample_source} image(s), max box difference {self.max_box_diff_px:.2g} px "
            f"(tolerance {self.tolerance_px:g}), max score difference {self.max_score_diff:.2g}, "
            f"{self.unmatched} without a match"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def torch_outputs(detector: nn.Module, image: torch.Tensor) -> Outputs:
    """PyTorch's raw detections of one uint8 image, the reference every graph is checked against."""
    detector.eval()
    with torch.no_grad():
        return {key: value.numpy() for key, value in detector([image.float() / 255.0])[0].items()}


def check_parity(
    detector: nn.Module,
    session: Any,
    output_names: Sequence[str],
    images: Sequence[torch.Tensor],
    *,
    sample_source: str,
    min_score: float = 0.0,
    top_k: int = PARITY_TOP_K,
    tolerance_px: float = PARITY_TOLERANCE_PX,
) -> ParityReport:
    """The one-image graph in ``session`` against PyTorch on ``images`` (uint8 CHW)."""

    def graph(image: torch.Tensor) -> Outputs:
        pixels = (image.float() / 255.0).numpy()
        return dict(zip(output_names, session.run(None, {"image": pixels}), strict=True))

    runs = [(torch_outputs(detector, image), graph(image)) for image in images]
    return compare_runs(
        runs,
        sample_source=sample_source,
        min_score=min_score,
        top_k=top_k,
        tolerance_px=tolerance_px,
        reference="PyTorch",
    )


def check_against(
    reference: Callable[[torch.Tensor], Outputs],
    candidate: Callable[[Sequence[torch.Tensor]], list[Outputs]],
    images: Sequence[torch.Tensor],
    *,
    reference_name: str,
    sample_source: str,
    min_score: float = 0.0,
    tolerance_px: float = PARITY_TOLERANCE_PX,
) -> ParityReport:
    """``candidate`` (all ``images`` in one call, as a batch) against ``reference``, image by image."""
    runs = list(zip([reference(image) for image in images], candidate(images), strict=True))
    return compare_runs(
        runs,
        sample_source=sample_source,
        min_score=min_score,
        tolerance_px=tolerance_px,
        reference=reference_name,
    )


def compare_runs(
    runs: Sequence[tuple[Outputs, Outputs]],
    *,
    sample_source: str,
    min_score: float = 0.0,
    top_k: int = PARITY_TOP_K,
    tolerance_px: float = PARITY_TOLERANCE_PX,
    reference: str = "PyTorch",
) -> ParityReport:
    """Match the reference's top ``top_k`` detections of each image to ones with the same label and score.

    The detections compared are those a user sees (score above ``min_score``); only if no
    image has any are the best ones below it compared instead. Low-score boxes are left out
    because near-equal ones overlap: a rounding difference upstream can make NMS keep the
    other one of a pair, which says nothing about the export. Detections are matched, not
    compared by rank, as equal scores may come out in either order.
    """
    floor = min_score if any((expected["scores"] > min_score).any() for expected, _ in runs) else -1.0
    compared = unmatched = count_differences = 0
    max_box = max_score = 0.0
    for expected, actual in runs:
        count_differences += int(np.sum(expected["scores"] > floor) != np.sum(actual["scores"] > floor))
        order = np.argsort(-expected["scores"], kind="stable")
        for index in order[expected["scores"][order] > floor][:top_k]:
            compared += 1
            candidates = np.flatnonzero(
                (actual["labels"] == expected["labels"][index])
                & (np.abs(actual["scores"] - expected["scores"][index]) <= _SCORE_TOLERANCE)
            )
            if candidates.size == 0:
                unmatched += 1
                continue
            box_diffs = np.abs(actual["boxes"][candidates] - expected["boxes"][index]).max(axis=1)
            best = candidates[int(np.argmin(box_diffs))]
            max_box = max(max_box, float(box_diffs.min()))
            max_score = max(max_score, float(abs(actual["scores"][best] - expected["scores"][index])))
    return ParityReport(
        images=len(runs),
        compared=compared,
        unmatched=unmatched,
        max_box_diff_px=max_box,
        max_score_diff=max_score,
        count_differences=count_differences,
        tolerance_px=tolerance_px,
        sample_source=sample_source,
        scope=f"score > {min_score:g}" if floor == min_score else f"best below the threshold {min_score:g}",
        reference=reference,
    )
