"""Batch-norm statistics recomputed before evaluation: they match the data, frozen layers keep theirs."""

from __future__ import annotations

import torch
from torch import nn

from visionautoml.training.norms import recalibrate_batch_norm, trainable_norms


class TwoNorms(nn.Module):
    """A detector-shaped module (a list of images in) with a trainable and a frozen batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.BatchNorm2d(3, momentum=0.03)
        self.frozen = nn.BatchNorm2d(3)
        self.frozen.requires_grad_(False)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.frozen(self.trained(torch.stack(images)))


def test_recalibration_gives_the_datas_statistics_and_leaves_frozen_layers_alone():
    torch.manual_seed(0)
    model = TwoNorms()
    batches = [([torch.randn(3, 4, 4) * 2 + 5 for _ in range(4)], []) for _ in range(20)]
    assert trainable_norms(model) == ["trained"]
    model.train()
    model(batches[0][0])  # one training step's worth: momentum 0.03 barely moves the averages
    assert model.trained.running_mean.max() < 0.5
    frozen_mean = model.frozen.running_mean.clone()

    recalibrate_batch_norm(model.eval(), trainable_norms(model), batches, torch.device("cpu"), 4)
    seen = torch.stack([image for images, _ in batches[:16] for image in images])  # 64 images
    assert torch.allclose(model.trained.running_mean, seen.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(model.trained.running_var, seen.var(dim=(0, 2, 3)), rtol=0.02)
    assert model.trained.momentum == 0.03 and not model.training and not model.trained.training
    assert torch.equal(model.frozen.running_mean, frozen_mean)
