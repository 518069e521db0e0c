"""VOC -> AutoML JSONL: visionautoml against the original flow's loop, on many files and on dense ones.

The original flow converted with a per-file ElementTree loop that printed one line per
file; `data convert --to jsonl --validation-every 5` replaces it. Both run here in the
same process on the same generated files (page cache warmed first, runs alternated),
their outputs are checked to hold the same boxes, and the table gives the ratio. Two
cases: 10,000 files of 1-3 objects (a raccoon-style export), and 100 dense files of 50-300
objects each (where compiling a parser per object count used to take 25 s).

Two more rows say whether the fast XML path (`_vocxml.py`) earns its place: the same
`convert` with every file read by ElementTree, and by lxml when it is importable.

    .venv/bin/python benchmarks/bench_convert.py [--files 10000] [--dense-files 100]
        [--dense-min-objects 50] [--dense-objects 300] [--repeat 3]

Images are tiny identical JPEGs: neither converter decodes pixels when the XML has a size
(visionautoml checks that each image is a complete JPEG: its first and last bytes).
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
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from visionautoml.data.convert import convert
from visionautoml.data.formats import voc
from visionautoml.data.formats._vocxml import Fields, _tree_fields

GOAL = 3.0


def generate(root: Path, files: int, seed: int = 0, objects_per_file: tuple[int, int] = (1, 3)) -> None:
    """A VOC folder shaped like the raccoon export: indented XML, 1-3 objects (or more), some difficult."""
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
        for _ in range(rng.randint(*objects_per_file)):
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


class _ElementTreeReader:
    """The VOC reader's field reader with every file parsed by ElementTree (no learned plans)."""

    def read(self, data: bytes) -> Fields | str:
        return _tree_fields(data)


class _LxmlReader:
    """The same fields read with lxml (not a dependency: a row only when it is importable)."""

    def __init__(self) -> None:
        from lxml import etree

        self.etree = etree
        self.parser = etree.XMLParser(resolve_entities=False, no_network=True)

    def read(self, data: bytes) -> Fields | str:
        try:
            root = self.etree.fromstring(data, self.parser)
        except self.etree.XMLSyntaxError as error:
            return str(error)
        keys = ("xmin", "ymin", "xmax", "ymax")
        objects = [
            (o.findtext("name"), o.findtext("difficult"), *(o.findtext(f"bndbox/{k}") for k in keys))
            for o in root.findall("object")
        ]
        width, height = root.findtext("size/width"), root.findtext("size/height")
        return Fields(root.tag, root.findtext("filename"), width, height, objects)


@contextlib.contextmanager
def field_reader(reader: type) -> Iterator[None]:
    original = voc.FieldReader
    voc.FieldReader = reader
    try:
        yield
    finally:
        voc.FieldReader = original


def run_with(reader: type) -> Callable[[Path, Path], tuple[float, float]]:
    def run(src: Path, out: Path) -> tuple[float, float]:
        with field_reader(reader):
            return run_visionautoml(src, out)

    return run


def lxml_available() -> bool:
    try:
        import lxml.etree  # noqa: F401
    except ImportError:
        return False
    return True


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


def run_case(work: Path, title: str, files: int, objects: tuple[int, int], repeat: int) -> bool:
    """Generate one case, time every contender on it, print its table; True if the outputs agree."""
    src = work / title.split()[0]
    print(f"generating {title} in {src} ...", file=sys.stderr)
    generate(src, files, objects_per_file=objects)
    for path in (src / "annotations").iterdir():  # warm the page cache for every contender
        path.read_bytes()
    contenders: dict[str, Callable[[Path, Path], tuple[float, float]]] = {
        "original loop": lambda source, out: run_original(source, out, out.with_suffix(".log")),
        "visionautoml": run_visionautoml,
        "  ElementTree": run_with(_ElementTreeReader),
    }
    if lxml_available():
        contenders["  lxml"] = run_with(_LxmlReader)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for attempt in range(repeat):
        order = list(contenders.items())
        for name, run in order if attempt % 2 == 0 else reversed(order):
            times[name].append(run(src, work / f"{src.name}-{name.strip()}-{attempt}"))

    original_boxes, original_validation = boxes_of(work / f"{src.name}-original loop-0")
    same = True
    for name in contenders:
        if name != "original loop":
            same &= boxes_of(work / f"{src.name}-{name.strip()}-0")[0] == original_boxes
    wall = {name: statistics.median(run[0] for run in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(run[1] for run in runs) for name, runs in times.items()}
    print(f"\nVOC -> JSONL, {title}, median of {repeat} runs (seconds)\n")
    columns = ("wall", "files/s", "speed-up", "CPU", "speed-up")
    print(f"{'converter':<14} " + " ".join(f"{c:>{len(c) + 2}}" for c in columns) + "   wall runs")
    for name, runs in times.items():
        listed = ", ".join(f"{run[0]:.3f}" for run in runs)
        print(
            f"{name:<14} {wall[name]:>6.3f} {files / wall[name]:>9.0f} "
            f"{wall['original loop'] / wall[name]:>9.2f}x {cpu[name]:>5.3f} "
            f"{cpu['original loop'] / cpu[name]:>9.2f}x   {listed}"
        )
    ratio = wall["original loop"] / wall["visionautoml"]
    print(f"\nsame boxes in every output: {same} ({sum(original_boxes.values())} boxes)")
    print(f"validation lines: {original_validation} in each")
    print(f"goal >= {GOAL:g}x (wall): {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.2f}x)")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--dense-files", type=int, default=100)
    parser.add_argument("--dense-objects", type=int, default=300, help="most objects in a dense file")
    parser.add_argument("--dense-min-objects", type=int, default=50, help="fewest (issue 11 had 50-300)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as temporary:
        work = Path(temporary)
        same = run_case(work, f"many {args.files} files x 1-3 objects", args.files, (1, 3), args.repeat)
        dense = (min(args.dense_min_objects, args.dense_objects), args.dense_objects)
        title = f"dense {args.dense_files} files x {dense[0]}-{dense[1]} objects"
        same &= run_case(work, title, args.dense_files, dense, args.repeat)
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (2 cores)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
