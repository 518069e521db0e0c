"""Training throughput of the visionautoml trainer against a torchvision-references loop, and raccoon quality.

Throughput (default): the same model, data, batch size and image size through
:func:`visionautoml.training.trainer.fit` (with its input pipeline, checkpoints and
progress) and through a plain loop written like torchvision's ``references/detection``
(``train_one_epoch``: decode with ``torchvision.io`` per sample, horizontal flip, the model
resizes), runs alternated, images/s and the ratio side by side. Goal: ratio >= 1.0.

Quality (``--quality``): the example config ``examples/raccoon-single.yaml`` from scratch on
raccoon's 160/40 split for a fixed wall-time budget; mAP@0.5 of the 40 validation images
against wall time since the start (data reading and model building included), appended to
``benchmarks/RESULTS.md`` with a PNG of the curve.

    .venv/bin/python benchmarks/bench_train.py [--epochs 2] [--repeat 2] [--batch 4]
    .venv/bin/python benchmarks/bench_train.py --quality [--minutes 10]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from visionautoml.config import TrainingParameters, load_config
from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import read_dataset
from visionautoml.data.split import split_every_nth
from visionautoml.evaluation.scoring import evaluate_predictions
from visionautoml.models.zoo import build_model, get_entry
from visionautoml.training.dataset import default_workers, make_data_loader
from visionautoml.training.evaluate import predict_loader
from visionautoml.training.trainer import fit, learning_rate_factor, seed_everything

ROOT = Path(__file__).resolve().parent.parent
RACCOON = ROOT.parent / "shared" / "datasets" / "raccoon"
EXAMPLE = ROOT / "examples" / "raccoon-single.yaml"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MACHINE = "2-core x86_64 CPU, 24 GiB, no GPU"
QUALITY_BUDGET_MINUTES = 10.0


# --- the baseline: torchvision references/detection, condensed ------------------------------------


class ReferenceDataset(torch.utils.data.Dataset):
    """Like the references' ``CocoDetection`` + ``get_transform(train=True)``: decode, flip, to float."""

    def __init__(self, dataset: Dataset) -> None:
        self.records = dataset.images
        self.ids = {name: index + 1 for index, name in enumerate(dataset.classes)}
        self.transforms = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float, scale=True)])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = decode_image(str(record.path), mode=ImageReadMode.RGB)
        boxes = torch.tensor([[b.xmin, b.ymin, b.xmax, b.ymax] for b in record.boxes], dtype=torch.float32)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes.reshape(-1, 4), format="XYXY", canvas_size=(record.height, record.width)
            ),
            "labels": torch.tensor([self.ids[b.label] for b in record.boxes], dtype=torch.int64),
        }
        image, target = self.transforms(tv_tensors.Image(image), target)
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}


def reference_collate(batch):
    return tuple(zip(*batch, strict=True))


def reference_train(model, dataset: Dataset, params: TrainingParameters, epochs: int, workers: int) -> None:
    """``references/detection/engine.train_one_epoch`` minus its logger; optimizer and schedule as ours."""
    loader = DataLoader(
        ReferenceDataset(dataset),
        batch_size=params.training_batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=reference_collate,
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.learning_rate,
        weight_decay=params.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(params, len(loader)))
    model.train()
    for _ in range(epochs):
        for images, targets in loader:
            loss_dict = model(list(images), list(targets))
            losses = sum(loss for loss in loss_dict.values())
            if not math.isfinite(losses.item()):
                sys.exit(f"loss is {losses.item()}, stopping training")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()


# --- measurements -----------------------------------------------------------------------------------


def raccoon_split() -> tuple[Dataset, Dataset]:
    if not (RACCOON / "annotations").is_dir():
        sys.exit(f"raccoon data not found at {RACCOON}")
    return split_every_nth(read_dataset(RACCOON), 5)


def throughput(args: argparse.Namespace) -> None:
    args.epochs = args.epochs or 2
    train, _ = raccoon_split()
    square = get_entry(args.model).family in ("ssd", "yolox")
    sizes = (
        {"image_size": args.image_size}
        if square
        else {"min_size": args.image_size, "max_size": 2 * args.image_size}
    )
    params = TrainingParameters(
        model_name=args.model,
        pretrained="none",
        **sizes,
        optimizer="adamw",
        learning_rate=1e-3,
        training_batch_size=args.batch,
        number_of_epochs=args.epochs,
        early_stopping=False,
        evaluation_frequency=args.epochs,
    )
    workers = default_workers() if params.number_of_workers is None else params.number_of_workers
    images = len(train.images) * args.epochs

    def ours(device: str = "cpu") -> float:
        seed_everything(0)
        model = build_model(params.model_name, len(train.classes) + 1, params)
        started = time.perf_counter()
        loader = make_data_loader(train, params, train=True)  # its decoding and caching count
        with tempfile.TemporaryDirectory() as checkpoints:
            fit(
                model,
                loader,
                lambda module: {"mean_average_precision": 0.0},
                params,
                Path(checkpoints),
                device=torch.device(device),
            )
        return time.perf_counter() - started

    def reference() -> float:
        seed_everything(0)
        model = build_model(params.model_name, len(train.classes) + 1, params)
        started = time.perf_counter()
        reference_train(model, train, params, args.epochs, workers)
        return time.perf_counter() - started

    runs: dict[str, list[float]] = {"reference loop": [], "visionautoml": []}
    for _ in range(args.repeat):
        runs["reference loop"].append(reference())
        runs["visionautoml"].append(ours())
    baseline = statistics.median(runs["reference loop"])
    print(
        f"\n{args.model}, image size {args.image_size}, batch {args.batch}, "
        f"{len(train.images)} raccoon images x {args.epochs} epochs, {torch.get_num_threads()} threads, "
        f"{workers} loader worker(s), median of {args.repeat}\n"
    )
    print(f"{'loop':<16} {'seconds':>8} {'images/s':>9} {'ratio':>6}   runs")
    for name, times in runs.items():
        median = statistics.median(times)
        shown = ", ".join(f"{t:.1f}" for t in times)
        print(f"{name:<16} {median:8.1f} {images / median:9.2f} {baseline / median:5.2f}x   {shown}")
    ratio = baseline / statistics.median(runs["visionautoml"])
    print(f"\ngoal ratio >= 1.0: {'met' if ratio >= 1.0 else 'NOT met'} ({ratio:.2f}x)")
    # The trainer on a GPU beside the CPU: mixed precision, channels_last and the loader sized to the machine.
    cpu_seconds = statistics.median(runs["visionautoml"])
    print(f"\n{'device':<10} {'images/s':>9} {'vs cpu':>7}")
    print(f"{'cpu':<10} {images / cpu_seconds:9.2f} {1.0:6.2f}x")
    if torch.cuda.is_available():
        ours("cuda")  # warm-up: CUDA context and kernels
        seconds = statistics.median(ours("cuda") for _ in range(args.repeat))
        print(f"{'cuda':<10} {images / seconds:9.2f} {cpu_seconds / seconds:6.2f}x")
    else:
        print("cuda       (no GPU on this machine)")


def quality(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    job = load_config(EXAMPLE)
    params = job.training_parameters
    if args.minutes is not None:  # shorter trial runs: the example's reserve for logging is kept
        reserve = QUALITY_BUDGET_MINUTES - (params.max_minutes or QUALITY_BUDGET_MINUTES)
        params = params.model_copy(update={"max_minutes": args.minutes - reserve})
    if args.epochs is not None:
        params = params.model_copy(update={"number_of_epochs": args.epochs})
    budget = args.minutes or QUALITY_BUDGET_MINUTES
    train, validation = raccoon_split()
    seed_everything(params.seed)
    model = build_model(params.model_name, len(train.classes) + 1, params)
    train_loader = make_data_loader(train, params, train=True)
    validation_loader = make_data_loader(validation, params, train=False)
    curve: list[tuple[float, int, float, float]] = []

    def evaluate(module):
        truths, found = predict_loader(module, validation_loader, "cpu")
        return evaluate_predictions(truths, found, validation.classes, params).metrics

    def record(epoch: int, metrics: dict) -> None:
        minutes = (time.perf_counter() - started) / 60
        curve.append((minutes, epoch, metrics["map_50"], metrics["map"]))
        print(
            f"{minutes:6.2f} min  epoch {epoch:3d}  mAP@0.5 {metrics['map_50']:.4f}  mAP {metrics['map']:.4f}"
        )

    with tempfile.TemporaryDirectory() as checkpoints:
        outcome = fit(model, train_loader, evaluate, params, Path(checkpoints), on_evaluation=record)
    total = (time.perf_counter() - started) / 60
    best = max(curve, key=lambda point: point[2])
    plot = Path(args.results).parent / "raccoon_quality.png"
    _plot(curve, plot, params, budget)
    table = "\n".join(f"{m:6.2f}  {e:5d}  {m50:.4f}  {mm:.4f}" for m, e, m50, mm in curve)
    recipe = (
        f"{params.model_name}, pretrained {params.pretrained}, {params.optimizer} "
        f"lr {params.learning_rate:g}, {params.learning_rate_scheduler}, image size {params.image_size}, "
        f"batch {params.training_batch_size}, {params.number_of_epochs} epochs planned, "
        f"max_minutes {params.max_minutes:g}"
    )
    verdict = "met" if best[2] >= 0.65 and best[0] <= QUALITY_BUDGET_MINUTES else "NOT met"
    section = "\n".join(
        [
            "",
            "## Raccoon quality in a fixed budget (`benchmarks/bench_train.py --quality`)",
            "",
            f"`examples/raccoon-single.yaml` ({recipe}) from scratch on raccoon's every-5th split",
            "(160 training / 40 validation images). Time counts from the start (data reading and model",
            "building included).",
            f"Plot: `{plot.name}`.",
            "",
            f"- Command: `.venv/bin/python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`",
            f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {MACHINE} ({platform.machine()}, {torch.get_num_threads()} torch threads)",
            "",
            "```",
            "minutes  epoch  mAP@0.5  mAP@[.5:.95]",
            table,
            "```",
            "",
            f"Best mAP@0.5 {best[2]:.4f} at {best[0]:.2f} min (epoch {best[1]}); "
            f"stopped: {outcome.stop_reason} after {outcome.epochs_completed} epochs, {total:.2f} min.",
            f"Goal (mAP@0.5 >= 0.65 within 10 minutes): {verdict}.",
            "",
        ]
    )
    with Path(args.results).open("a", encoding="utf-8") as results:
        results.write(section)
    print(section)


def _plot(curve, path: Path, params: TrainingParameters, minutes: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([p[0] for p in curve], [p[2] for p in curve], marker="o", label="mAP@0.5")
    axes.plot([p[0] for p in curve], [p[3] for p in curve], marker=".", label="mAP@[.5:.95]")
    axes.axhline(0.65, color="grey", linestyle="--", linewidth=1, label="goal 0.65")
    axes.set(xlabel="wall time (minutes)", ylabel="validation mAP", xlim=(0, minutes), ylim=(0, 1))
    axes.set_title(f"{params.model_name} from scratch, raccoon 160/40, 2 CPU cores", fontsize=9)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quality", action="store_true", help="run the fixed-budget quality benchmark")
    parser.add_argument(
        "--minutes", type=float, help="quality: a shorter budget than the example's 10 minutes"
    )
    parser.add_argument("--model", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--epochs", type=int, help="throughput: epochs per run (2); quality: override the example's"
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="quality: the Markdown file to append to")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's); 1 on a machine shared with others",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quality(args) if args.quality else throughput(args)


if __name__ == "__main__":
    main()
