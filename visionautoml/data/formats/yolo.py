"""YOLO txt: ``images/`` and ``labels/`` with ``class cx cy w h`` lines normalised to [0, 1].

Class names come from ``data.yaml`` (``names:`` as a list or an ``{id: name}`` map) or
``classes.txt`` (one per line). An image without a label file has no objects, as in
YOLO tools. The format has no crowd flag: crowd boxes are written as ordinary boxes.
Label files hold no image size, so reading asks every image's header for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.formats._common import Rendered, checked_box, is_image_name, number, unique_stems
from visionautoml.data.formats._paths import DataRoot, files_by_name, walk_files
from visionautoml.data.images import probe_image
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

NAMES_FILES = ("data.yaml", "classes.txt")


def looks_like_yolo(path: Path) -> bool:
    return (path / "labels").is_dir() and any((path / name).is_file() for name in NAMES_FILES)


def read(
    path: Path, problems: ProblemLog, *, datastore_root: Path | None = None, image_root: Path | None = None
) -> Dataset:
    """The images are what ``images/`` holds; a link in it that leads out of the dataset is an error."""
    if not path.is_dir() or not (path / "images").is_dir():
        raise DataError(f"{path}: not a YOLO folder; expected images/, labels/ and data.yaml or classes.txt")
    root = DataRoot(image_root if image_root is not None else path)
    if not root.contains_real(os.path.realpath(path / "images")):
        raise DataError(
            f"{path / 'images'}: a symbolic link out of {root}; copy the real folder into the dataset"
        )
    classes = _class_names(path, problems)
    label_dir = path / "labels"
    label_names: set[str] = set()
    if label_dir.is_dir() and DataRoot(path).contains_real(os.path.realpath(label_dir)):
        label_names = set(walk_files(label_dir, DataRoot(path))[0])
    records: list[ImageRecord] = []
    used_labels: set[str] = set()
    images, outside = files_by_name(path / "images", root)
    for name, target in sorted(outside.items()):
        link = path / "images" / name
        problems.error(link, f"a symbolic link to {target}, outside {root}; it is not read", record=link)
    for name, image_path in sorted(images.items()):
        if not is_image_name(name):
            continue
        label_name = os.path.splitext(name)[0] + ".txt"
        try:
            info = probe_image(image_path)
        except DataError as error:
            problems.error(image_path, str(error).removeprefix(f"{image_path}: "), record=image_path)
            continue
        boxes: list[Box] = []
        source = label_dir / label_name
        if label_name in label_names:
            used_labels.add(label_name)
            boxes = _boxes(source, classes, (info.width, info.height), image_path, problems)
        records.append(ImageRecord(name, image_path, info.width, info.height, boxes, str(source)))
    for name in sorted(label_names - used_labels):
        if name.endswith(".txt"):
            problems.warning(label_dir / name, "label file has no image with the same name; it is left out")
    return Dataset(records, classes)


def _class_names(path: Path, problems: ProblemLog) -> list[str]:
    data_yaml, classes_txt = path / NAMES_FILES[0], path / NAMES_FILES[1]
    try:
        if data_yaml.is_file():
            return _names_from_yaml(data_yaml, yaml.safe_load(data_yaml.read_bytes()))
        if classes_txt.is_file():
            text = classes_txt.read_bytes().decode("utf-8")
            return [line.strip() for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as error:
        file = data_yaml if data_yaml.is_file() else classes_txt
        problems.error(file, f"cannot read the class names ({error}); fix the file")
        return []
    raise DataError(f"{path}: YOLO needs the class names in data.yaml (names: [...]) or classes.txt")


def _names_from_yaml(file: Path, document: object) -> list[str]:
    names = document.get("names") if isinstance(document, dict) else None
    if isinstance(names, dict) and all(isinstance(key, int) for key in names):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"names ids must be 0..{len(names) - 1} without gaps, found {sorted(names)}")
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(name, str | int) for name in names):
        raise ValueError(f"{file.name} needs names: a list of class names or a map {{0: name, ...}}")
    return [str(name) for name in names]


def _boxes(
    file: Path, classes: list[str], size: tuple[int, int], image: Path, problems: ProblemLog
) -> list[Box]:
    width, height = size
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as error:
        problems.error(file, f"cannot read the file: {error.strerror or error}", record=image)
        return []
    except UnicodeDecodeError:
        problems.error(file, "not a text file (invalid UTF-8); fix or re-export the labels", record=image)
        return []
    boxes: list[Box] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            problems.error(
                file,
                f"expected 5 values 'class cx cy w h', got {len(fields)} "
                "(segmentation labels are not supported)",
                line=line_number,
                record=image,
            )
            continue
        class_id = number(fields[0])
        if class_id is None or class_id != int(class_id) or not 0 <= class_id < len(classes):
            problems.error(
                file,
                f"class {fields[0]!r} is not an id in 0..{len(classes) - 1} of the class names",
                line=line_number,
                field="class",
                record=image,
            )
            continue
        values = [number(field) for field in fields[1:]]
        if None in values:
            problems.error(file, "cx cy w h must be numbers", line=line_number, record=image)
            continue
        cx, cy, w, h = (value or 0.0 for value in values)
        coordinates = (
            (cx - w / 2) * width,
            (cy - h / 2) * height,
            (cx + w / 2) * width,
            (cy + h / 2) * height,
        )
        label = classes[int(class_id)]
        box = checked_box(
            problems, file, "box", coordinates, label, False, width, height, line=line_number, record=image
        )
        if box is not None:
            boxes.append(box)
    return boxes


def render(dataset: Dataset, out_dir: Path, *, copy_images: bool = True) -> Rendered:
    """``images/``, ``labels/`` (one txt per image, empty when it has no boxes) and ``data.yaml``.

    The layout needs the images beside the labels, so they are always copied.
    """
    images = sorted(dataset.images, key=lambda image: image.name)
    unique_stems((image.name for image in images), "YOLO")
    class_ids = {name: index for index, name in enumerate(dataset.classes)}
    files: dict[str, bytes] = {}
    for image in images:
        lines = []
        for box in image.boxes:
            if box.label not in class_ids:
                raise DataError(
                    f"{image.source}: label {box.label!r} is not in the class list {dataset.classes}"
                )
            cx, cy = (box.xmin + box.xmax) / 2 / image.width, (box.ymin + box.ymax) / 2 / image.height
            w, h = box.width / image.width, box.height / image.height
            lines.append(f"{class_ids[box.label]} {cx!r} {cy!r} {w!r} {h!r}\n")
        files[f"labels/{os.path.splitext(image.name)[0]}.txt"] = "".join(lines).encode()
    names = yaml.safe_dump(
        {"nc": len(dataset.classes), "names": list(dataset.classes)}, sort_keys=False, allow_unicode=True
    )
    files["data.yaml"] = names.encode()
    return Rendered(files, {f"images/{image.name}": image.path for image in images})
