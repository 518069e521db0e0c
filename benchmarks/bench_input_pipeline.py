"""Throughput of the training input pipeline against a straightforward one, beside the model's step.

Baseline: what a first version does: decode every sample from disk at its original size,
then flip, a box-aware ``RandomAffine`` scale jitter and ``ColorJitter`` with hue, all on
uint8 (the model resizes afterwards). Then visionautoml's ``DetectionDataset`` with decoding
on every sample (``cache_bytes=0``) and with its defaults (pre-resized to the model's scale,
decoded once into memory). The last row is one training step of the model per image, so the
loader's share of an epoch can be read off. One process, one thread, no loader workers
(workers only hide the loader's cost, they do not reduce it). Runs alternated, median.

    .venv/bin/python benchmarks/bench_input_pipeline.py [--model fasterrcnn_resnet50_fpn] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from visionautoml.config import TrainingParameters
from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import read_dataset
from visionautoml.data.images import decode_image_file
from visionautoml.models.zoo import build_model, get_entry
from visionautoml.training.dataset import collate, make_data_loader

ROOT = Path(__file__).resolve().parent.parent
RACCOON = ROOT.parent / "shared" / "datasets" / "raccoon"


def baseline_samples(dataset: Dataset) -> Callable[[int], tuple[torch.Tensor, dict]]:
    transforms = v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.75, 1.25))], p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)], p=0.5),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    classes = {name: index + 1 for index, name in enumerate(dataset.classes)}

    def sample(index: int) -> tuple[torch.Tensor, dict]:
        record = dataset.images[index]
        image = tv_tensors.Image(decode_image_file(record.path))
        boxes = [[b.xmin, b.ymin, b.xmax, b.ymax] for b in record.boxes]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[1:])),
            "labels": torch.tensor([classes[b.label] for b in record.boxes]),
        }
        return transforms(image, target)

    return sample


def epoch_seconds(step: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model-images", type=int, default=8, help="images timed through the model step")
    args = parser.parse_args()
    if not (RACCOON / "annotations").is_dir():
        print(f"needs the raccoon dataset at {RACCOON}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    dataset = read_dataset(RACCOON)
    params = TrainingParameters(model_name=args.model, pretrained="none", number_of_workers=0)
    count = len(dataset.images)

    baseline = baseline_samples(dataset)
    uncached = make_data_loader(dataset, params, train=True, cache_bytes=0)
    build_start = time.perf_counter()
    cached = make_data_loader(dataset, params, train=True)
    preload = time.perf_counter() - build_start

    runs: dict[str, list[tuple[float, float]]] = {"baseline": [], "decode per sample": [], "visionautoml": []}
    for _ in range(args.repeat):
        torch.manual_seed(0)
        runs["baseline"].append(epoch_seconds(lambda: [baseline(i) for i in range(count)]))
        runs["decode per sample"].append(epoch_seconds(lambda: list(uncached)))
        runs["visionautoml"].append(epoch_seconds(lambda: list(cached)))

    model = build_model(args.model, len(dataset.classes) + 1, params).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    batches = [collate([cached.dataset[i]]) for i in range(args.model_images)]

    def train_steps() -> None:
        for images, targets in batches:
            optimizer.zero_grad()
            sum(model(images, targets).values()).backward()
            optimizer.step()

    model_wall, model_cpu = epoch_seconds(train_steps)
    scale = count / args.model_images

    base_wall, base_cpu = (statistics.median(x) for x in zip(*runs["baseline"], strict=True))
    size = get_entry(args.model).input_size(params).describe()
    print(f"{count} raccoon images, {args.model} (input {size}), 1 thread, no loader workers")
    print(f"{'pipeline':<22}{'epoch s':>9}{'img/s':>8}{'speed-up':>10}{'CPU s':>8}{'speed-up':>10}")
    for name, values in runs.items():
        wall, cpu = (statistics.median(x) for x in zip(*values, strict=True))
        ratios = f"{base_wall / wall:9.2f}x{cpu:8.2f}{base_cpu / cpu:9.2f}x"
        print(f"{name:<22}{wall:9.2f}{count / wall:8.1f}{ratios}")
    print(f"{'model train step':<22}{model_wall * scale:9.2f}{count / (model_wall * scale):8.1f}", end="")
    print(f"{'':>10}{model_cpu * scale:8.2f}   (extrapolated from {args.model_images} images)")
    print(f"one-off decode into memory: {preload:.2f} s ({cached.dataset.decoded_bytes() / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
