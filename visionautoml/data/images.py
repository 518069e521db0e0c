"""Every image a dataset, a trial, ``predict`` or the scoring service touches goes through here.

Image files come from users and from the network, so nothing here trusts them: the header
is read first and an image claiming more than :data:`MAX_PIXELS` is refused before any
pixel is decoded (a decompression bomb), and the pixels are decoded by Pillow alone.
torchvision's native decoders are not used on untrusted bytes: its PNG decoder takes the
whole process down (SIGSEGV) on a PNG whose IDAT holds too little data, and Pillow's
``Image.verify()`` does not catch that file (it checks chunk CRCs, not the pixel data), so
verifying first would mean decoding twice. Pillow decodes the raccoon JPEGs in the time
the native decoder plus a Pillow check needs (``benchmarks/RESULTS.md``).

The canonical orientation is the displayed one (EXIF orientation applied, as a viewer shows
the picture and as annotators drew the boxes), and every image becomes uint8 RGB.
:func:`probe_image` reads headers only (cheap enough for every image of a dataset);
:func:`verify_image_file` checks that a file is a complete image of a known format, the
check ``convert`` and ``register`` make on every image they accept; :func:`check_image`
decodes all pixels, which is what ``data validate`` does.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, UnidentifiedImageError

from visionautoml.errors import DataError, first_line

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 80_000_000
"""Largest accepted width x height: 80 megapixels, above any camera a detector is trained on."""

_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_FORMAT_NAMES = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
    "WEBP": "webp",
}
_SUFFIX_FORMATS = {"jpeg": "jpg", "jpe": "jpg", "tif": "tiff"}
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC share the range but are not frames.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_HEADER_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """``format`` is the short name the AutoML JSONL uses (``jpg``, ``png`` ...), from the content."""

    format: str
    width: int
    height: int
    exif_orientation: int = 1


@dataclass(frozen=True, slots=True)
class CheckedImage:
    info: ImageInfo
    sha256: str


def format_name_for_suffix(name: str) -> str:
    """The JSONL ``image_details.format`` a file name implies (used where images are not opened)."""
    dot = name.rfind(".")
    suffix = name[dot + 1 :].lower() if dot >= 0 and "/" not in name[dot:] else ""
    return _SUFFIX_FORMATS.get(suffix, suffix)


def _orientation(image: Image.Image) -> int:
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make an otherwise good image unreadable
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _info(image: Image.Image) -> ImageInfo:
    orientation = _orientation(image)
    width, height = image.size
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    name = _FORMAT_NAMES.get(image.format or "", (image.format or "unknown").lower())
    return ImageInfo(name, width, height, orientation)


def _open(source: str | Path | BinaryIO, label: str) -> Image.Image:
    """Pillow's lazy open (header only), every failure a DataError naming ``label``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(source)
    except FileNotFoundError:
        raise DataError(f"{label}: image file not found; check the path in the annotation") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not an image in any known format; use JPEG or PNG files") from None
    except Image.DecompressionBombError:
        raise DataError(
            f"{label}: refused, the image claims more than {MAX_PIXELS:,} pixels (decompression bomb?)"
        ) from None
    except OSError as error:
        if error.errno is not None:
            raise DataError(f"{label}: cannot read the image: {error.strerror or error}") from None
        raise DataError(f"{label}: not a readable image ({first_line(error)}); replace the file") from None
    except Exception as error:  # a decoder plugin choking on garbage: still bad data, not a bug of ours
        raise DataError(
            f"{label}: not a readable image ({type(error).__name__}: {first_line(error)})"
        ) from None


def _check_pixels(width: int, height: int, label: str, max_pixels: int) -> None:
    if width < 1 or height < 1 or width * height > max_pixels:
        raise DataError(
            f"{label}: refused, {width}x{height} pixels is outside 1..{max_pixels:,} pixels "
            "(decompression bomb?); downscale the image first"
        )


def _load(image: Image.Image, label: str) -> None:
    """Decode the pixels; a truncated or corrupt file is a DataError (Pillow never fills in gaps here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except DataError:
        raise
    except Exception as error:
        raise DataError(
            f"{label}: cannot decode the image ({first_line(error)}); it is truncated or corrupt, "
            "replace the file"
        ) from None


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: cannot read the image: image file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the image: {error.strerror or error}") from None


def image_size_from_header(data: bytes, *, name: str = "image") -> tuple[int, int]:
    """(width, height) as stored, read from the header only; DataError if the bytes are no image."""
    image = _open(io.BytesIO(data), name)
    try:
        return image.size
    finally:
        image.close()


def probe_image(path: str | Path) -> ImageInfo:
    """Format, displayed size and EXIF orientation from the file's header; pixels are not decoded."""
    image = _open(path, str(path))
    try:
        return _info(image)
    finally:
        image.close()


def decoded_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The upright RGB Pillow image of ``data``, fully decoded; DataError for bad or oversized input."""
    image = _open(io.BytesIO(data), name)
    try:
        _check_pixels(*image.size, name, max_pixels)
        orientation = _orientation(image)
        _load(image, name)
        if orientation in _TRANSPOSES:
            image = image.transpose(_TRANSPOSES[orientation])
        return _rgb(image)
    except DataError:
        image.close()
        raise


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: deep grey images are scaled (not clipped) to 8 bits, as torchvision scales them."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        import numpy as np

        values = np.asarray(image)
        if image.mode == "F":
            values = np.clip(values, 0, 255)
        else:
            values = np.clip(values.astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def decode_image_bytes(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A uint8 CHW RGB tensor, EXIF orientation applied; DataError for undecodable or oversized input."""
    import numpy as np
    import torch

    with decoded_image(data, name=name, max_pixels=max_pixels) as image:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def decode_image_file(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """:func:`decode_image_bytes` of a file, naming the file in errors."""
    return decode_image_bytes(_read(path), name=str(path), max_pixels=max_pixels)


def preview_image(path: str | Path, max_side: int, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The upright RGB image scaled to at most ``max_side`` pixels a side, for plots and pages.

    JPEGs are decoded at a reduced scale (far cheaper on large photos); images over
    ``max_pixels`` are refused from the header like everywhere else (DataError).
    """
    image = _open(io.BytesIO(_read(path)), str(path))
    try:
        _check_pixels(*image.size, str(path), max_pixels)
        orientation = _orientation(image)
        if image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        _load(image, str(path))
        if orientation in _TRANSPOSES:
            image = image.transpose(_TRANSPOSES[orientation])
        image = _rgb(image)
        scale = min(1.0, max_side / max(image.size))
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        return image
    except DataError:
        image.close()
        raise


def check_image(path: str | Path) -> CheckedImage:
    """Decode the whole image (at reduced scale for JPEG, which still reads every byte).

    Raises :class:`DataError` for a missing, truncated, corrupt or oversized file. The
    digest lets validation find the same picture stored under two names.
    """
    data = _read(path)
    image = _open(io.BytesIO(data), str(path))
    try:
        info = _info(image)
        _check_pixels(*image.size, str(path), MAX_PIXELS)
        if image.format == "JPEG":
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        _load(image, str(path))
    finally:
        image.close()
    return CheckedImage(info, hashlib.sha256(data).hexdigest())


def verify_image_file(path: str | Path) -> None:
    """Refuse a file that is not a complete image of a known format within :data:`MAX_PIXELS`.

    What ``convert`` and ``register`` check on every image, so a zero-byte file, a text
    file named ``.jpg`` or a truncated download fails there with its name instead of in a
    training run. A JPEG that starts with a frame header of a sane size and ends with the
    end-of-image marker passes on its first and last bytes (nothing is decoded, which keeps
    converting 10,000s of images fast); anything else is decoded in full. Decoding every
    pixel of every JPEG is ``data validate``'s job.
    """
    try:
        data = _read_quick(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read the image: {error.strerror or error}") from None
    if not data:
        raise DataError(f"{path}: the image file is empty (0 bytes); replace it")
    if data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0\r\n ")[-2:] == b"\xff\xd9":
        size = _jpeg_size(data)
        if size is not None:
            _check_pixels(*size, str(path), MAX_PIXELS)
            return
    if isinstance(data, _Head):
        data = _read(path)
    decoded_image(data, name=str(path)).close()


class _Head(bytes):
    """The first and last bytes of a large file: enough for the quick JPEG check, not for decoding."""


def _read_quick(path: str | Path) -> bytes:
    """The file, or for a large one its header and its last bytes (one open either way)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        data = os.read(descriptor, 65536)
        if len(data) < 65536:
            return data
        size = os.fstat(descriptor).st_size
        if size <= 2 * 65536:
            return data + os.pread(descriptor, size - len(data), len(data))
        header = data + os.pread(descriptor, _JPEG_HEADER_LIMIT - len(data), len(data))
        return _Head(header[: _JPEG_HEADER_LIMIT - 64] + os.pread(descriptor, 64, size - 64))
    finally:
        os.close(descriptor)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first frame header, walking the marker segments; None if unclear."""
    position, end = 2, min(len(data), _JPEG_HEADER_LIMIT - 64)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        if length < 2:
            return None
        if marker in _JPEG_FRAMES:
            if position + 9 > end or length < 8:
                return None
            height, width = struct.unpack_from(">HH", data, position + 5)
            return (width, height) if width and height else None  # 0: the height comes later (DNL)
        if marker in (0xDA, 0xD9):  # scan or end before any frame header: not a JPEG we can size
            return None
        position += 2 + length
    return None
