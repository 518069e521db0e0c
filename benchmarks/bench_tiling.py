"""Small objects with and without tiling: the same model, data and training budget, side by side.

The data is built reproducibly (``--seed``) from raccoon: each canvas (1280x960 by default) is a
2x2 mosaic of raccoon photos, their raccoons labelled (large objects), with 4-8 raccoons cut
out of other photos by their boxes, scaled to 16-40 px on the longer side and pasted where
nothing else is (small objects, COCO ``area < 32^2`` mostly). Photos are split every 5th into
training and validation sources first, so no validation raccoon was seen in training. Written as
VOC (``--data DIR`` keeps it).

Two trainings of ``--model`` from scratch with one budget: without tiling, and with
``tile_grid_size`` (default 3x2; training on the canvases plus their tiles). ``--minutes`` is
turned into a number of optimizer steps at a step time measured once, so both variants get the
same training compute however the load of a shared machine changes, and each learning-rate
schedule is planned over its own epochs and ends inside the budget. Each model is then scored
on the validation canvases with whole-image inference and with whole image + tiles merged (the
validation loop's own path), so the table also shows tiling at inference only. Columns:
mAP@0.5 (COCO), small-object AP@0.5 (COCO's small area range at IoU 0.5, which
``evaluation.metrics`` does not report: its ``map_small`` averages IoU 0.5-0.95), ``map_small``,
and inference ms per image through the PyTorch predictor (``TiledPredictor`` when tiling; one
image at a time, median of 10).

Goal (issue 13): tiling at least doubles small-object AP@0.5 at no more than ~7x the compute for 3x2.

    .venv/bin/python benchmarks/bench_tiling.py [--minutes 5] [--grid 3x2] [--threads 1] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from PIL import Image

from visionautoml.config import Tiling, TrainingParameters
from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.formats import WRITERS, read_dataset
from visionautoml.data.formats._common import commit
from visionautoml.data.images import decode_image_file
from visionautoml.data.split import split_every_nth
from visionautoml.evaluation.metrics import coco_detections, coco_ground_truth
from visionautoml.evaluation.scoring import evaluate_predictions
from visionautoml.models.predictor import Predictor
from visionautoml.models.saved import ModelSpec
from visionautoml.models.tiling import TiledPredictor
from visionautoml.models.zoo import build_model
from visionautoml.training.dataset import make_data_loader
from visionautoml.training.evaluate import predict_loader
from visionautoml.training.trainer import fit, seed_everything

ROOT = Path(__file__).resolve().parent.parent
RACCOON = ROOT.parent / "shared" / "datasets" / "raccoon"
SMALL = 32 * 32


# --- the small-object data --------------------------------------------------------------------------


def _canvas(
    photos: list[ImageRecord], rng: random.Random, size: tuple[int, int], name: str, folder: Path
) -> ImageRecord:
    """A 2x2 mosaic of photos (their raccoons kept) with small raccoons from other photos pasted on."""
    width, height = size
    canvas = Image.new("RGB", size)
    boxes: list[Box] = []
    cell_w, cell_h = width // 2, height // 2
    for row in range(2):
        for column in range(2):
            photo = rng.choice(photos)
            sx, sy = cell_w / photo.width, cell_h / photo.height
            with Image.open(photo.path) as source:
                canvas.paste(source.convert("RGB").resize((cell_w, cell_h)), (column * cell_w, row * cell_h))
            for box in photo.boxes:
                x0, y0 = column * cell_w + box.xmin * sx, row * cell_h + box.ymin * sy
                boxes.append(
                    Box(
                        round(x0),
                        round(y0),
                        round(x0 + box.width * sx),
                        round(y0 + box.height * sy),
                        box.label,
                    )
                )
    for _ in range(rng.randint(4, 8)):
        photo = rng.choice(photos)
        box = rng.choice(photo.boxes)
        longer = rng.randint(16, 40)
        scale = longer / max(box.width, box.height)
        w, h = max(4, round(box.width * scale)), max(4, round(box.height * scale))
        for _attempt in range(100):
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            if all(x + w <= b.xmin or b.xmax <= x or y + h <= b.ymin or b.ymax <= y for b in boxes):
                break
        else:
            continue
        with Image.open(photo.path) as source:
            cut = (
                source.convert("RGB")
                .crop((box.xmin, box.ymin, box.xmax, box.ymax))
                .resize((w, h), Image.LANCZOS)
            )
        canvas.paste(cut, (x, y))
        boxes.append(Box(x, y, x + w, y + h, box.label))
    path = folder / f"{name}.jpg"
    canvas.save(path, quality=90)
    return ImageRecord(f"{name}.jpg", path, width, height, boxes)


def build_data(
    out: Path, train: int, validation: int, size: tuple[int, int], seed: int
) -> tuple[Dataset, Dataset]:
    """The training and validation canvases as VOC folders ``out/training`` and ``out/validation``."""
    photos = read_dataset(RACCOON)
    train_photos, validation_photos = split_every_nth(photos, 5)
    rng = random.Random(seed)
    sets = []
    with tempfile.TemporaryDirectory(prefix="bench-tiling-") as scratch:
        for split, sources, count in (
            ("training", train_photos, train),
            ("validation", validation_photos, validation),
        ):
            folder = Path(scratch) / split
            folder.mkdir()
            records = [_canvas(sources.images, rng, size, f"{split}-{i:03d}", folder) for i in range(count)]
            commit(out / split, WRITERS["voc"](Dataset(records, list(photos.classes)), out / split))
    for split in ("training", "validation"):
        sets.append(read_dataset(out / split, classes=list(photos.classes)))
    return sets[0], sets[1]


# --- metrics --------------------------------------------------------------------------------------


def _quiet(*_args: object, **_kwargs: object) -> None:
    """faster-coco-eval prints its summary otherwise."""


def small_ap50(ground_truths: list, detections: list, classes: list[str]) -> float:
    """COCO AP@0.5 over the small area range (area < 32^2), mean over classes with small objects."""
    truth = COCO(coco_ground_truth(ground_truths, classes), print_function=_quiet)
    found = truth.loadRes(coco_detections(detections))
    found.print_function = _quiet
    evaluator = COCOeval_faster(truth, found, iouType="bbox", print_function=_quiet)
    evaluator.evaluate()
    evaluator.accumulate()
    # precision: [IoU thresholds, recall points, classes, area ranges (all, small, ...), max detections]
    precision = np.asarray(evaluator.eval["precision"])[0, :, :, 1, -1]
    defined = precision[:, (precision > -1).all(axis=0)]
    return float(defined.mean()) if defined.size else -1.0


def score(
    module: torch.nn.Module,
    loader: Any,
    classes: list[str],
    params: TrainingParameters,
    tiling: Tiling | None,
) -> dict[str, float]:
    ground_truths, detections = predict_loader(
        module, loader, "cpu", tiling=tiling, detections_per_image=params.box_detections_per_image
    )
    metrics = evaluate_predictions(ground_truths, detections, classes, params).metrics
    return {
        "map_50": metrics["map_50"],
        "small_ap_50": small_ap50(ground_truths, detections, classes),
        "map_small": metrics["map_small"],
    }


def inference_ms(predictor: Predictor | TiledPredictor, images: list[torch.Tensor]) -> float:
    predictor.predict(images[:2])  # warm-up: the first calls allocate
    times = []
    for image in images:
        started = time.perf_counter()
        predictor.predict([image])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


# --- the two trainings ------------------------------------------------------------------------------


def _parameters(args: argparse.Namespace, grid: str | None, epochs: int) -> TrainingParameters:
    return TrainingParameters(
        model_name=args.model,
        pretrained="none",
        image_size=args.image_size,
        optimizer="adamw",
        learning_rate=args.learning_rate,
        training_batch_size=args.batch,
        validation_batch_size=args.batch,
        number_of_epochs=epochs,
        warmup_cosine_lr_warmup_epochs=max(1, round(epochs / 10)),
        evaluation_frequency=epochs,
        early_stopping=False,
        max_minutes=args.minutes * 3,  # a safety net: the budget is a number of steps (plan_epochs)
        number_of_workers=0,
        box_score_threshold=0.3,
        tile_grid_size=grid,
        seed=args.seed,
    )


def _forever(loader: Any) -> Any:
    while True:
        yield from loader


def _step_seconds(params: TrainingParameters, loader: Any, classes: int) -> float:
    """Seconds per training step of this model on this loader, from a few steps after a warm-up."""
    model = build_model(params.model_name, classes + 1, params).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.learning_rate)
    times = []
    for step, (images, targets) in zip(range(4), _forever(loader), strict=False):
        started = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def plan_epochs(args: argparse.Namespace, train: Dataset, classes: list[str]) -> dict[str | None, int]:
    """Epochs per variant for one budget of optimizer steps: ``--minutes`` at the step time measured now.

    A step costs the same with and without tiles (both are scaled to the model's input), so equal
    steps are equal training compute, and a machine whose load changes between the two runs
    cannot favour either. The step count is rounded to whole epochs of the tiled loader, the
    coarser one, and the other variant gets the nearest count of its own epochs.
    """
    lengths = {}
    for grid in (None, args.grid):
        lengths[grid] = len(make_data_loader(train, _parameters(args, grid, 1), train=True))
    probe = _parameters(args, None, 1)
    step_s = _step_seconds(probe, make_data_loader(train, probe, train=True), len(classes))
    tiled_epochs = max(1, round(args.minutes * 60 / step_s / lengths[args.grid]))
    steps = tiled_epochs * lengths[args.grid]
    print(f"budget: {steps} steps of {args.batch} samples ({step_s:.2f} s a step measured)", flush=True)
    return {None: max(1, round(steps / lengths[None])), args.grid: tiled_epochs}


def train_variant(
    args: argparse.Namespace, grid: str | None, epochs: int, train: Dataset, classes: list[str]
) -> dict[str, Any]:
    params = _parameters(args, grid, epochs)
    loader = make_data_loader(train, params, train=True)
    seed_everything(params.seed)
    model = build_model(params.model_name, len(classes) + 1, params)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-tiling-ckpt-") as checkpoints:
        outcome = fit(
            model, loader, lambda module: {"mean_average_precision": 0.0}, params, Path(checkpoints)
        )
    return {
        "model": model.eval(),
        "params": params,
        "epochs": outcome.epochs_completed,
        "planned_epochs": epochs,
        "samples_per_epoch": len(getattr(loader, "plain", loader).dataset),  # a PhasedLoader's, with mosaic
        "steps": outcome.epochs_completed * len(loader),
        "train_s": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help="training budget per variant, as steps at the measured step time",
    )
    parser.add_argument("--grid", default="3x2", help="tile_grid_size of the tiled variant")
    parser.add_argument("--model", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-canvases", type=int, default=80)
    parser.add_argument("--validation-canvases", type=int, default=30)
    parser.add_argument("--canvas", default="1280x960", help="WIDTHxHEIGHT of a canvas")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data", type=Path, help="write the generated VOC set here (default: a temporary folder)"
    )
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args()
    if not (RACCOON / "annotations").is_dir():
        raise SystemExit(f"raccoon data not found at {RACCOON}")
    torch.set_num_threads(args.threads)
    size = tuple(int(part) for part in args.canvas.lower().split("x"))
    tiling = Tiling(tile_grid_size=args.grid)

    with tempfile.TemporaryDirectory(prefix="bench-tiling-data-") as scratch:
        data = args.data or Path(scratch)
        started = time.monotonic()
        train, validation = build_data(data, args.train_canvases, args.validation_canvases, size, args.seed)
        classes = list(train.classes)
        validation_loader = make_data_loader(validation, _parameters(args, None, 1), train=False)
        small = sum(box.area < SMALL for image in validation.images for box in image.boxes)
        total = sum(len(image.boxes) for image in validation.images)
        print(
            f"data: {len(train.images)} training / {len(validation.images)} validation canvases "
            f"{args.canvas}, {total} validation boxes of which {small} small (< 32^2), built in "
            f"{time.monotonic() - started:.0f} s"
        )
        pixels = [decode_image_file(record.path) for record in validation.images[:10]]
        rows = []
        epochs = plan_epochs(args, train, classes)
        for grid in (None, args.grid):
            variant = train_variant(args, grid, epochs[grid], train, classes)
            spec = ModelSpec.from_params(variant["params"], classes)
            predictor = Predictor(variant["model"], spec, batch_size=1)
            print(
                f"trained {'with ' + grid if grid else 'without'} tiling: {variant['epochs']}/"
                f"{variant['planned_epochs']} epochs of {variant['samples_per_epoch']} samples in "
                f"{variant['train_s']:.0f} s ({variant['steps']} steps)",
                flush=True,
            )
            for inference in (None, tiling):
                metrics = score(variant["model"], validation_loader, classes, variant["params"], inference)
                runner = TiledPredictor(predictor, inference) if inference else predictor
                rows.append(
                    {
                        "training": grid or "none",
                        "inference": inference.tile_grid_size if inference else "none",
                        **metrics,
                        "ms_per_image": inference_ms(runner, pixels),
                        "epochs": variant["epochs"],
                        "samples_per_epoch": variant["samples_per_epoch"],
                        "steps": variant["steps"],
                        "train_s": variant["train_s"],
                    }
                )
                rounded = {key: round(value, 4) for key, value in metrics.items()}
                print(f"  inference {rows[-1]['inference']}: {json.dumps(rounded)}", flush=True)
    _report(args, rows, small, total)


MEANINGFUL_AP = 0.05
"""Below this small-object AP@0.5 a model finds almost no small object, and a ratio is noise."""


def _report(args: argparse.Namespace, rows: list[dict[str, Any]], small: int, total: int) -> None:
    command = " ".join([".venv/bin/python benchmarks/bench_tiling.py", *sys.argv[1:]])
    print(f"\n- Command: `{command}`")
    print(
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"- {args.model} from scratch at {args.image_size} px, {args.minutes:g} min of training a variant; "
        f"validation: {args.validation_canvases} canvases {args.canvas}, {total} boxes, {small} small\n"
    )
    header = [
        "training tiles",
        "inference tiles",
        "epochs x samples (steps, train s)",
        "mAP@0.5",
        "small AP@0.5",
        "map_small",
    ]
    print(f"| {' | '.join(header)} | ms/image |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            row["training"],
            row["inference"],
            f"{row['epochs']} x {row['samples_per_epoch']} ({row['steps']} steps, {row['train_s']:.0f} s)",
            *(f"{row[key]:.3f}" for key in ("map_50", "small_ap_50", "map_small")),
            f"{row['ms_per_image']:.0f}",
        ]
        print(f"| {' | '.join(cells)} |")
    baseline, tiled = rows[0], rows[-1]
    if baseline["small_ap_50"] > 0:
        gain = tiled["small_ap_50"] / baseline["small_ap_50"]
    else:
        gain = float("inf") if tiled["small_ap_50"] > 0 else 0.0
    cost = tiled["ms_per_image"] / baseline["ms_per_image"]
    # A ratio of two APs near zero says nothing: the tiled model must find small objects at all.
    meaningful = tiled["small_ap_50"] >= MEANINGFUL_AP
    verdict = "met" if gain >= 2 and cost <= 7.5 and meaningful else "not met"
    if not meaningful:
        verdict += f" (small-object AP@0.5 under {MEANINGFUL_AP}: the model finds almost no small object)"
    print(
        f"\nsmall-object AP@0.5 {baseline['small_ap_50']:.3f} -> {tiled['small_ap_50']:.3f} ({gain:.1f}x, "
        f"goal >= 2x), inference {cost:.1f}x the compute (goal <= ~7x): {verdict}"
    )
    if args.output_json:
        arguments = {key: str(value) for key, value in vars(args).items()}
        args.output_json.write_text(json.dumps({"args": arguments, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
