"""What an image file really is: its format by content, its displayed size, whether it decodes.

Annotations state an image's size and the file name suggests its format; both can be
wrong. The canonical orientation is the displayed one (EXIF orientation applied),
because that is how training decodes images, so sizes here are displayed sizes.
:func:`probe_image` reads headers only (cheap enough for every image of a dataset);
:func:`check_image` also decodes the pixels, which is what catches truncated files.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from visionautoml.errors import DataError

_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

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


def _info(image: Image.Image) -> ImageInfo:
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make an otherwise good image unreadable
        orientation = 1
    if not 1 <= orientation <= 8:
        orientation = 1
    width, height = image.size
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    name = _FORMAT_NAMES.get(image.format or "", (image.format or "unknown").lower())
    return ImageInfo(name, width, height, orientation)


def _open(source: str | Path | BinaryIO, label: str) -> Image.Image:
    try:
        return Image.open(source)
    except FileNotFoundError:
        raise DataError(f"{label}: image file not found; check the path in the annotation") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not an image file (unknown or corrupt header); replace the file") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"{label}: image is too large to decode safely ({error})") from None
    except OSError as error:
        if error.errno is not None:
            raise DataError(f"{label}: cannot read the image: {error.strerror or error}") from None
        raise DataError(
            f"{label}: the image does not decode ({error}); it is truncated or corrupt, replace the file"
        ) from None
    except Exception as error:  # a decoder plugin choking on garbage: still bad data, not a bug of ours
        raise DataError(f"{label}: not a readable image ({type(error).__name__}: {error})") from None


def probe_image(path: str | Path) -> ImageInfo:
    """Format, displayed size and EXIF orientation from the file's header; pixels are not decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = _open(path, str(path))
        try:
            return _info(image)
        finally:
            image.close()


def check_image(path: str | Path) -> CheckedImage:
    """Decode the whole image (at reduced scale for JPEG, which still reads every byte).

    Raises :class:`DataError` for a missing, truncated or corrupt file. The digest lets
    validation find the same picture stored under two names.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check the path in the annotation") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the image: {error.strerror or error}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = _open(io.BytesIO(data), str(path))
        try:
            info = _info(image)
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        except DataError:
            raise
        except Exception as error:
            raise DataError(
                f"{path}: the image does not decode ({error}); it is truncated or corrupt, replace the file"
            ) from None
        finally:
            image.close()
    return CheckedImage(info, hashlib.sha256(data).hexdigest())
