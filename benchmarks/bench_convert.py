"""VOC -> AutoML JSONL for 10,000 annotation files: visionautoml against the original flow's loop.

The original flow converted with a per-file ElementTree loop that printed one line per
file; `data convert --to jsonl --validation-every 5` replaces it. Both run here in the
same process on the same generated files (page cache warmed first, runs alternated),
their outputs are checked to hold the same boxes, and the table gives the ratio.

    .venv/bin/python benchmarks/bench_convert.py [--files 10000] [--repeat 3]

Images are tiny identical JPEGs: neither converter decodes pixels when the XML has a size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from visionautoml.data.convert import convert

GOAL = 3.0


def generate(root: Path, files: int, seed: int = 0) -> None:
    """A VOC folder shaped like the raccoon export: indented XML, 1-3 objects, some difficult."""
    rng = random.Random(seed)
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 90, 60)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    for index in range(files):
        name = f"img-{index:05d}"
        width, height = rng.randint(200, 1024), rng.randint(150, 768)
        objects = []
        for _ in range(rng.randint(1, 3)):
            x0, y0 = rng.randint(0, width - 20), rng.randint(0, height - 20)
            x1, y1 = rng.randint(x0 + 10, width), rng.randint(y0 + 10, height)
            label = rng.choice(["raccoon", "dog", "cat"])
            difficult = int(rng.random() < 0.1)
            objects.append(
                f"\t<object>\n\t\t<name>{label}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
                f"\t\t<difficult>{difficult}</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n"
                f"\t\t\t<ymin>{y0}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n"
                "\t</object>\n"
            )
        (root / "annotations" / f"{name}.xml").write_text(
            f'<annotation verified="yes">\n\t<folder>images</folder>\n\t<filename>{name}.jpg</filename>\n'
            f"\t<path>/Users/someone/Desktop/data/images/{name}.jpg</path>\n\t<source>\n"
            "\t\t<database>Unknown</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n"
            f"\t</size>\n\t<segmented>0</segmented>\n{''.join(objects)}</annotation>\n",
            encoding="utf-8",
        )
        (root / "images" / f"{name}.jpg").write_bytes(jpeg)


def original_convert(src: str, out_dir: str) -> None:
    """The original flow's converter, loop body verbatim; its prints go to whatever stdout is."""
    annotations_folder = os.path.join(src, "annotations")
    train_annotations_file = os.path.join(out_dir, "train_annotations.jsonl")
    validation_annotations_file = os.path.join(out_dir, "validation_annotations.jsonl")
    json_line_sample = {
        "image_url": "AmlDatastore://workspaceblobstore/" + os.path.basename(src) + "/",
        "image_details": {"format": None, "width": None, "height": None},
        "label": [],
    }
    with open(train_annotations_file, "w") as train_f, open(validation_annotations_file, "w") as validation_f:
        for i, filename in enumerate(os.listdir(annotations_folder)):
            if filename.endswith(".xml"):
                print("Parsing " + os.path.join(src, filename))
                root = ET.parse(os.path.join(annotations_folder, filename)).getroot()
                width = int(root.find("size/width").text)
                height = int(root.find("size/height").text)
                labels = []
                for object in root.findall("object"):
                    name = object.find("name").text
                    xmin = object.find("bndbox/xmin").text
                    ymin = object.find("bndbox/ymin").text
                    xmax = object.find("bndbox/xmax").text
                    ymax = object.find("bndbox/ymax").text
                    isCrowd = int(object.find("difficult").text)
                    labels.append(
                        {
                            "label": name,
                            "topX": float(xmin) / width,
                            "topY": float(ymin) / height,
                            "bottomX": float(xmax) / width,
                            "bottomY": float(ymax) / height,
                            "isCrowd": isCrowd,
                        }
                    )
                image_filename = root.find("filename").text
                _, file_extension = os.path.splitext(image_filename)
                json_line = dict(json_line_sample)
                json_line["image_url"] = json_line["image_url"] + "images/" + image_filename
                json_line["image_details"]["format"] = file_extension[1:]
                json_line["image_details"]["width"] = width
                json_line["image_details"]["height"] = height
                json_line["label"] = labels
                if i % 5 == 0:
                    validation_f.write(json.dumps(json_line) + "\n")
                else:
                    train_f.write(json.dumps(json_line) + "\n")


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds): on a shared machine CPU time shows the work without the waiting."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_original(src: Path, out: Path, log: Path) -> tuple[float, float]:
    """stdout goes to a real file, as a CI job's log would: the prints are part of the cost."""
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file, contextlib.redirect_stdout(log_file):
        return timed(lambda: (original_convert(str(src), str(out)), log_file.flush()))


def run_visionautoml(src: Path, out: Path) -> tuple[float, float]:
    return timed(lambda: convert(src, out, "jsonl", validation_every=5))


def boxes_of(out: Path) -> tuple[Counter, int]:
    """Every box as (image file, label, coordinates, crowd), and the number of validation lines."""
    boxes: Counter = Counter()
    for name in ("train_annotations.jsonl", "validation_annotations.jsonl"):
        for line in (out / name).read_text().splitlines():
            record = json.loads(line)
            image = os.path.basename(record["image_url"])
            for box in record["label"]:
                coordinates = tuple(round(box[key], 12) for key in ("topX", "topY", "bottomX", "bottomY"))
                boxes[(image, box["label"], coordinates, int(box["isCrowd"]))] += 1
    validation = len((out / "validation_annotations.jsonl").read_text().splitlines())
    return boxes, validation


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as temporary:
        work = Path(temporary)
        src = work / "voc"
        print(f"generating {args.files} VOC files in {src} ...", file=sys.stderr)
        generate(src, args.files)
        for path in (src / "annotations").iterdir():  # warm the page cache for both contenders
            path.read_bytes()

        times: dict[str, list[tuple[float, float]]] = {"original loop": [], "visionautoml": []}
        for attempt in range(args.repeat):
            pair = [
                (
                    "original loop",
                    lambda a=attempt: run_original(src, work / f"orig-{a}", work / f"o-{a}.log"),
                ),
                ("visionautoml", lambda a=attempt: run_visionautoml(src, work / f"va-{a}")),
            ]
            for name, run in pair if attempt % 2 == 0 else reversed(pair):
                times[name].append(run())

        original_boxes, original_validation = boxes_of(work / "orig-0")
        ours_boxes, ours_validation = boxes_of(work / "va-0")
        same = original_boxes == ours_boxes
        wall = {name: statistics.median(run[0] for run in runs) for name, runs in times.items()}
        cpu = {name: statistics.median(run[1] for run in runs) for name, runs in times.items()}
        print(f"\nVOC -> JSONL, {args.files} files, median of {args.repeat} runs (seconds)\n")
        columns = ("wall", "files/s", "speed-up", "CPU", "speed-up")
        print(f"{'converter':<14} " + " ".join(f"{c:>{len(c) + 2}}" for c in columns) + "   wall runs")
        for name, runs in times.items():
            listed = ", ".join(f"{run[0]:.3f}" for run in runs)
            print(
                f"{name:<14} {wall[name]:>6.3f} {args.files / wall[name]:>9.0f} "
                f"{wall['original loop'] / wall[name]:>9.2f}x {cpu[name]:>5.3f} "
                f"{cpu['original loop'] / cpu[name]:>9.2f}x   {listed}"
            )
        ratio = wall["original loop"] / wall["visionautoml"]
        print(f"\nsame boxes in both outputs: {same} ({sum(ours_boxes.values())} boxes)")
        print(f"validation lines: original {original_validation}, visionautoml {ours_validation}")
        print(f"goal >= {GOAL:g}x (wall): {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.2f}x)")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
