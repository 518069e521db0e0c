"""Helpers every format shares: box checks, file listing, image names, atomic multi-file output.

Kept here so that each format module is only the mapping between its files and the
canonical model, and so that every format reports the same problem the same way. Where
paths from data may lead is ``_paths.py``.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePath
from typing import NamedTuple

from visionautoml.data.annotations import Box
from visionautoml.data.formats._paths import record_provenance, safe_relative
from visionautoml.data.problems import ProblemLog, Repair
from visionautoml.errors import DataError
from visionautoml.files import atomic_path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Boxes computed from normalised coordinates can overshoot an edge by a rounding error;
# within this many pixels they are put back on the edge instead of being reported.
_EDGE_TOLERANCE = 1e-6


def number(value: object) -> float | None:
    """A finite number from JSON/XML/text, or None: booleans, NaN and infinities are not coordinates."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            result = float(value)
        except (ValueError, OverflowError):
            return None
        return result if math.isfinite(result) else None
    return None


def image_size(value: object) -> int | None:
    """A positive whole number of pixels; the cloud service's JSONL also writes sizes as ``"400px"``."""
    if isinstance(value, str):
        value = value.strip().removesuffix("px")
    result = number(value)
    if result is None or result != int(result) or result < 0:
        return None
    return int(result)


def crowd_flag(value: object) -> bool | None:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        value = value.strip().lower()
        return {"0": False, "1": True, "false": False, "true": True}.get(value)
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    return None


def checked_box(
    problems: ProblemLog,
    file: object,
    field: str,
    coordinates: tuple[float, float, float, float],
    label: str,
    iscrowd: bool,
    width: int,
    height: int,
    *,
    line: int | None = None,
    record: object = None,
) -> Box | None:
    """The box, repaired where that is safe, or None with the problem recorded.

    A zero-area box (a click without a drag) marks nothing and is dropped; a box that
    leaves the image is clipped to it. Both are warnings naming the box, so one stray
    click among thousands does not refuse a dataset the user cannot edit. An inverted
    box, one wholly outside the image or one without a label says the annotation is wrong
    in a way no rule can fix: an error, against ``record`` (the image it spoils).
    """
    xmin, ymin, xmax, ymax = coordinates
    shown = f"({_fmt(xmin)}, {_fmt(ymin)}, {_fmt(xmax)}, {_fmt(ymax)})"
    if not label:
        problems.error(
            file, "the label is empty; give every box a class name", line=line, field=field, record=record
        )
        return None
    if xmax < xmin or ymax < ymin:
        problems.error(
            file,
            f"box '{label}' {shown} has negative area: the max corner must be right of and below the min "
            "corner; fix or delete the box",
            line=line,
            field=field,
            record=record,
        )
        return None
    if xmax == xmin or ymax == ymin:
        problems.warning(
            file,
            f"box '{label}' {shown} has zero area; it is dropped (the source is not changed)",
            line=line,
            field=field,
            repair=Repair.DROPPED_BOX,
        )
        return None
    xmin, ymin = _snap(xmin, 0.0), _snap(ymin, 0.0)
    xmax, ymax = _snap(xmax, float(width)), _snap(ymax, float(height))
    if xmin >= 0 and ymin >= 0 and xmax <= width and ymax <= height:
        return Box(xmin, ymin, xmax, ymax, label, iscrowd)
    clipped = (max(xmin, 0.0), max(ymin, 0.0), min(xmax, float(width)), min(ymax, float(height)))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        problems.error(
            file,
            f"box '{label}' {shown} lies wholly outside the {width}x{height} image; fix the coordinates "
            "or the image size",
            line=line,
            field=field,
            record=record,
        )
        return None
    problems.warning(
        file,
        f"box '{label}' {shown} extends outside the {width}x{height} image; it is clipped to "
        f"({', '.join(_fmt(value) for value in clipped)}) (the source is not changed)",
        line=line,
        field=field,
        repair=Repair.CLIPPED,
    )
    return Box(*clipped, label, iscrowd)


def _snap(value: float, edge: float) -> float:
    return edge if abs(value - edge) <= _EDGE_TOLERANCE else value


def _fmt(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.6g}"


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while a reader builds tens of thousands of records.

    The records hold no reference cycles, yet every collection pass walks all of them
    again: up to a third of the time of reading a large dataset. Reference counting still
    frees everything as usual; the collector resumes (if it was on) when the block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def location(source: str) -> tuple[str, int | None]:
    """(file, line) from an :class:`ImageRecord` source, which is ``file`` or ``file:line``."""
    file, separator, line = source.rpartition(":")
    return (file, int(line)) if separator and line.isdigit() else (source, None)


def is_image_name(name: str) -> bool:
    return name[name.rfind(".") :].lower() in IMAGE_SUFFIXES


def names_under_common_folder(paths: list[str]) -> list[str]:
    """Image names for formats that point at images by arbitrary paths (JSONL, COCO).

    Relative to the deepest folder holding all of them, so the same images get the same
    names whether a JSONL refers to them as ``../data/images/a.jpg`` or by absolute path.
    """
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(path) for path in paths])
    cut = len(root) if root.endswith("/") else len(root) + 1
    return [path[cut:] for path in paths]


class RelativePaths:
    """POSIX paths relative to one folder, computing ``relpath`` once per image folder (hot path).

    Keyed by the path's parts, which a ``Path`` keeps, rather than by its string, which
    it would have to build for every image.
    """

    def __init__(self, base: Path) -> None:
        self._base = os.path.abspath(base)
        self._folders: dict[tuple[str, ...], str] = {}

    def __call__(self, path: PurePath) -> str:
        parts = path.parts
        folder = parts[:-1]
        relative = self._folders.get(folder)
        if relative is None:
            absolute = os.path.abspath(os.path.join(*folder) if folder else os.curdir)
            relative = self._folders[folder] = os.path.relpath(absolute, self._base).replace(os.sep, "/")
        return parts[-1] if relative == "." else f"{relative}/{parts[-1]}"


def unique_stems(names: Iterable[str], fmt: str) -> None:
    """VOC and YOLO name annotation files after the image; two images must not share one."""
    seen: dict[str, str] = {}
    for name in names:
        stem = os.path.splitext(name)[0]
        if stem in seen:
            raise DataError(
                f"{fmt} names annotation files after images, and '{seen[stem]}' and '{name}' would share "
                f"'{stem}': rename one of the images"
            )
        seen[stem] = name


class Rendered(NamedTuple):
    """A writer's output, not yet on disk: POSIX paths relative to the output folder.

    ``external`` names the annotation files whose image paths lead out of their folder
    (``image_url`` / ``file_name`` relative to the output, images left where they are) and
    the folder holding those images, so :func:`commit` can record that this tool wrote them.
    """

    files: dict[str, bytes]
    copies: dict[str, Path]
    external: tuple[tuple[str, str], ...] = ()

    def under(self, folder: str) -> Rendered:
        return Rendered(
            {f"{folder}/{key}": value for key, value in self.files.items()},
            {f"{folder}/{key}": value for key, value in self.copies.items()},
            tuple((f"{folder}/{key}", root) for key, root in self.external),
        )


def commit(out_dir: Path, *outputs: Rendered) -> list[Path]:
    """Write all outputs at once: each top-level entry is staged beside ``out_dir`` and renamed last.

    A failure leaves ``out_dir`` as it was. Top-level folders (``images/``,
    ``annotations/`` ...) are replaced whole so no stale file from an earlier run remains;
    anything else already in ``out_dir`` is left alone. Every path is checked to stay
    inside ``out_dir`` before anything is written.
    """
    files = {safe_relative(key, out_dir): value for output in outputs for key, value in output.files.items()}
    copies = {
        safe_relative(key, out_dir): value for output in outputs for key, value in output.copies.items()
    }
    external = {key: root for output in outputs for key, root in output.external}
    tops: dict[str, bool] = {}
    for relative in [*files, *copies]:
        top, separator, _ = relative.partition("/")
        tops[top] = tops.get(top, False) or bool(separator)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            staged = {
                top: stack.enter_context(atomic_path(out_dir / top, directory=is_dir))
                for top, is_dir in sorted(tops.items())
            }
            made: set[Path] = set()

            def destination(relative: str) -> Path:
                top, _, rest = relative.partition("/")
                target = staged[top] / rest if rest else staged[top]
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                return target

            for relative, data in files.items():
                destination(relative).write_bytes(data)
            for relative, source in copies.items():
                shutil.copyfile(source, destination(relative))
        record_provenance(out_dir, list(files), external)
    except OSError as error:
        raise DataError(f"cannot write to {out_dir}: {error}; check the folder and its permissions") from None
    return [out_dir / top for top in sorted(tops)]
