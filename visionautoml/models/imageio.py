"""Decode untrusted image bytes to the uint8 RGB tensors every model and service consumes.

Training, batch prediction and the scoring service all decode through here, so they
agree on orientation (EXIF applied, as a viewer shows the picture and as annotators
drew the boxes) and on colour (grayscale, palette and alpha images become RGB). The
pixel count is read from the header before decoding, so a tiny file that claims to be a
gigapixel image (a decompression bomb) is refused instead of exhausting memory.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from visionautoml.errors import DataError

MAX_PIXELS = 80_000_000
"""Largest accepted width x height: 80 megapixels, above any camera a detector is trained on."""


def image_size_from_header(data: bytes, *, name: str = "image") -> tuple[int, int]:
    """(width, height) as stored, read from the header only; DataError if the bytes are no image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError:
        raise DataError(
            f"{name}: refused, the image claims more than {MAX_PIXELS:,} pixels (decompression bomb?)"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image in any known format; use JPEG or PNG files") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(
            f"{name}: not a readable image ({_first_line(error)}); use JPEG or PNG files"
        ) from None


def decode_image_bytes(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A uint8 CHW RGB tensor, EXIF orientation applied; DataError for undecodable or oversized input."""
    width, height = image_size_from_header(data, name=name)
    if width * height > max_pixels or width < 1 or height < 1:
        raise DataError(
            f"{name}: refused, {width}x{height} pixels is outside 1..{max_pixels:,} pixels "
            "(decompression bomb?); downscale the image first"
        )
    try:
        image = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=ImageReadMode.RGB,
            apply_exif_orientation=True,
        )
    except RuntimeError:
        image = _decode_with_pillow(data, name)
    if image.ndim == 4:
        image = image[0]
    if image.dtype != torch.uint8:
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def decode_image_file(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """:func:`decode_image_bytes` of a file, naming the file in errors."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the image: {error.strerror or error}") from None
    return decode_image_bytes(data, name=str(path), max_pixels=max_pixels)


def _decode_with_pillow(data: bytes, name: str) -> torch.Tensor:
    """Formats torchvision cannot decode (BMP, TIFF ...), and files it rejects that Pillow repairs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                rgb = ImageOps.exif_transpose(image).convert("RGB")
                array = np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(
            f"{name}: cannot decode the image ({_first_line(error)}); is the file complete?"
        ) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
