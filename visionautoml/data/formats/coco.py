"""COCO instances JSON: ``images``, ``annotations`` (``bbox`` = x, y, w, h) and ``categories``.

The categories, ordered by id, are the class list. A dataset is the JSON file itself or
a folder holding ``annotations.json``; ``file_name`` is resolved against the JSON's
folder, then its ``images/`` subfolder (the layout this module writes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from visionautoml.data.annotations import Dataset, ImageRecord
from visionautoml.data.formats._common import (
    RelativePaths,
    Rendered,
    checked_box,
    crowd_flag,
    image_size,
    names_under_common_folder,
    number,
)
from visionautoml.data.formats._paths import DataRoot, PathRefused, external_root, trusted_image_root
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

ANNOTATION_FILE = "annotations.json"


def annotation_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    if (path / ANNOTATION_FILE).is_file():
        return path / ANNOTATION_FILE
    candidates = sorted(path.glob("*.json"))
    return candidates[0] if len(candidates) == 1 else None


def read(
    path: Path, problems: ProblemLog, *, datastore_root: Path | None = None, image_root: Path | None = None
) -> Dataset:
    """``file_name`` must stay inside the JSON's folder, ``image_root`` when given, or the image
    folder ``data convert`` recorded when it wrote the file."""
    file = annotation_file(path)
    if file is None:
        raise DataError(f"{path}: no COCO file found; pass the JSON file or a folder with {ANNOTATION_FILE}")
    try:
        document = json.loads(file.read_bytes())
    except OSError as error:
        problems.error(file, f"cannot read the file: {error.strerror or error}")
        return Dataset([], [])
    except (ValueError, RecursionError) as error:
        problems.error(file, f"not valid JSON ({error}); fix or re-export the file")
        return Dataset([], [])
    if not isinstance(document, dict):
        problems.error(file, "a COCO file is a JSON object with images, annotations and categories")
        return Dataset([], [])
    sections = {key: document.get(key, []) for key in ("images", "annotations", "categories")}
    for key, value in sections.items():
        if not isinstance(value, list):
            problems.error(file, "must be a list", field=key)
            return Dataset([], [])
    categories = _categories(sections["categories"], file, problems)
    trusted = trusted_image_root(file) if image_root is None else None
    root = DataRoot(image_root or trusted or file.parent)
    images = _images(sections["images"], file, root, problems)
    for index, annotation in enumerate(sections["annotations"]):
        _annotation(annotation, f"annotations[{index}]", images, categories, file, problems)
    records = list(images.values())
    names = names_under_common_folder([str(record.path) for record in records])
    for record, name in zip(records, names, strict=True):
        record.name = name
    return Dataset(records, [name for _, name in sorted(categories.items())])


def _categories(entries: list[object], file: Path, problems: ProblemLog) -> dict[int, str]:
    categories: dict[int, str] = {}
    for index, entry in enumerate(entries):
        field = f"categories[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            problems.error(file, "each category needs an integer id and a non-empty name", field=field)
            continue
        category_id = entry.get("id")
        if not isinstance(category_id, int) or isinstance(category_id, bool):
            problems.error(file, f"id must be an integer, not {category_id!r}", field=f"{field}.id")
        elif category_id in categories:
            problems.error(file, f"category id {category_id} is used twice", field=f"{field}.id")
        elif entry["name"] in categories.values():
            problems.error(file, f"category name {entry['name']!r} is used twice", field=f"{field}.name")
        else:
            categories[category_id] = entry["name"]
    return categories


def _images(
    entries: list[object], file: Path, root: DataRoot, problems: ProblemLog
) -> dict[object, ImageRecord]:
    images: dict[object, ImageRecord] = {}
    for index, entry in enumerate(entries):
        field = f"images[{index}]"
        record = f"{file} [{field}]"
        if not isinstance(entry, dict):
            problems.error(
                file,
                "each image must be an object {id, file_name, width, height}",
                field=field,
                record=record,
            )
            continue
        image_id, file_name = entry.get("id"), entry.get("file_name")
        if not isinstance(image_id, int | str) or isinstance(image_id, bool) or image_id in images:
            problems.error(
                file, f"missing, invalid or repeated id {image_id!r}", field=f"{field}.id", record=record
            )
            continue
        if not isinstance(file_name, str) or not file_name.strip():
            problems.error(file, "missing; give the image's path", field=f"{field}.file_name", record=record)
            continue
        try:
            path = _image_path(file.parent, file_name.strip(), root)
        except PathRefused as refused:
            problems.error(file, str(refused), field=f"{field}.file_name", record=record)
            continue
        width, height = image_size(entry.get("width")), image_size(entry.get("height"))
        if not width or not height:
            problems.error(file, "width and height must be positive whole numbers", field=field, record=path)
            continue
        images[image_id] = ImageRecord("", path, width, height, [], str(file))
    return images


def _image_path(base: Path, file_name: str, root: DataRoot) -> Path:
    """``file_name`` beside the JSON, else in its ``images/`` folder (the layout this module writes)."""
    try:
        return root.file(file_name, base)
    except PathRefused as refused:
        if "not found" not in str(refused) or os.path.isabs(file_name):
            raise
        try:
            return root.file(file_name, base / "images")
        except PathRefused:
            raise refused from None


def _annotation(
    entry: object,
    field: str,
    images: dict[object, ImageRecord],
    categories: dict[int, str],
    file: Path,
    problems: ProblemLog,
) -> None:
    if not isinstance(entry, dict):
        problems.error(file, "each annotation must be an object", field=field, record=f"{file} [{field}]")
        return
    image = images.get(entry.get("image_id")) if isinstance(entry.get("image_id"), int | str) else None
    if image is None:
        problems.error(
            file,
            f"image_id {entry.get('image_id')!r} is not a usable image",
            field=f"{field}.image_id",
            record=f"{file} [{field}]",
        )
        return
    category_id = entry.get("category_id")
    category = categories.get(category_id) if isinstance(category_id, int) else None
    if category is None:
        problems.error(
            file,
            f"category_id {entry.get('category_id')!r} is not in categories",
            field=f"{field}.category_id",
            record=image.path,
        )
        return
    bbox = entry.get("bbox")
    values = [number(value) for value in bbox] if isinstance(bbox, list) and len(bbox) == 4 else []
    if len(values) != 4 or None in values:
        problems.error(
            file,
            f"must be 4 numbers [x, y, width, height], not {bbox!r}",
            field=f"{field}.bbox",
            record=image.path,
        )
        return
    crowd = crowd_flag(entry.get("iscrowd"))
    if crowd is None:
        problems.error(file, "must be 0 or 1", field=f"{field}.iscrowd", record=image.path)
        return
    x, y, w, h = (value or 0.0 for value in values)
    box = checked_box(
        problems,
        file,
        field,
        (x, y, x + w, y + h),
        category,
        crowd,
        image.width,
        image.height,
        record=image.path,
    )
    if box is not None:
        image.boxes.append(box)


def render(dataset: Dataset, out_dir: Path, *, copy_images: bool = False) -> Rendered:
    """``annotations.json``; ``file_name`` is relative to ``out_dir`` (``images/NAME`` with copies)."""
    images = sorted(dataset.images, key=lambda image: image.name)
    relative = RelativePaths(out_dir)
    category_ids = {name: index for index, name in enumerate(dataset.classes, start=1)}
    image_entries: list[dict[str, object]] = []
    annotation_entries: list[dict[str, object]] = []
    for image_id, image in enumerate(images, start=1):
        file_name = f"images/{image.name}" if copy_images else relative(image.path)
        image_entries.append(
            {"id": image_id, "file_name": file_name, "width": image.width, "height": image.height}
        )
        for box in image.boxes:
            if box.label not in category_ids:
                raise DataError(
                    f"{image.source}: label {box.label!r} is not in the class list {dataset.classes}"
                )
            annotation_entries.append(
                {
                    "id": len(annotation_entries) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[box.label],
                    "bbox": [box.xmin, box.ymin, box.width, box.height],
                    "area": box.area,
                    "iscrowd": int(box.iscrowd),
                }
            )
    document = {
        "info": {"description": "written by visionautoml"},
        "licenses": [],
        "images": image_entries,
        "annotations": annotation_entries,
        "categories": [{"id": i, "name": name, "supercategory": "none"} for name, i in category_ids.items()],
    }
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    if copy_images:
        return Rendered(
            {ANNOTATION_FILE: text.encode()}, {f"images/{image.name}": image.path for image in images}
        )
    external = tuple(
        (ANNOTATION_FILE, root) for root in external_root((image.path for image in images), out_dir)
    )
    return Rendered({ANNOTATION_FILE: text.encode()}, {}, external)
