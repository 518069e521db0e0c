"""An exponential moving average of a model's weights, as real-time detectors train (YOLOX, YOLOv5).

Evaluating and saving the average instead of the raw weights smooths out the noise of the
last steps, which on small data is most of the gap between a good epoch and a bad one. The
decay ramps up from 0 (``decay * (1 - exp(-updates / ramp))``), so the average follows the
model closely while it still changes fast and averages over more steps later; both scale
with the run's length (:meth:`ModelEMA.for_steps`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from visionautoml.config import TrainingParameters
from visionautoml.models.zoo import get_entry


def ema_enabled(params: TrainingParameters) -> bool:
    """``weights_ema``, whose default (None) means: on for the YOLO family, off otherwise."""
    if params.weights_ema is None:
        return get_entry(params.model_name).family == "yolox"
    return params.weights_ema


class ModelEMA:
    """The averaged copy of ``model``; :meth:`update` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp_steps: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.ramp_steps = ramp_steps
        self.updates = 0

    @classmethod
    def for_steps(cls, model: nn.Module, total_steps: int) -> ModelEMA:
        """An average over about the last tenth of a run of ``total_steps`` optimizer steps.

        YOLOX's 0.9998 (an average over ~5,000 steps, ramped over 2,000) suits COCO's tens of
        thousands of steps; a run of a few hundred would then end holding mostly its first
        weights. The horizon and the ramp scale with the run instead, capped at YOLOX's.
        """
        average = cls(model)
        average.set_horizon(total_steps)
        return average

    def set_horizon(self, total_steps: int) -> None:
        """Scale decay and ramp to a run of ``total_steps`` (again when a time budget re-plans the run)."""
        total = max(1, total_steps)
        self.decay = min(0.9998, 1.0 - 10.0 / total)
        self.ramp_steps = min(2000.0, max(1.0, total / 20))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1.0 - math.exp(-self.updates / self.ramp_steps))
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(current[name].detach(), alpha=1.0 - decay)
            else:  # batch-norm step counters: the model's own
                average.copy_(current[name])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
