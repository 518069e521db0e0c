"""Reading what a client sends, bounded before it costs memory: body, multipart, JSON, image headers.

Every limit is checked on the cheapest evidence first: the body's declared and streamed
size, the image count, then every image's pixel count from its header (per image and summed
over the request) before a single pixel is decoded. Decoding itself is
:mod:`visionautoml.data.images`' (Pillow only), so a bad file is a 4xx, never a dead worker.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import torch
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from visionautoml.data.images import decode_image_bytes, image_size_from_header
from visionautoml.errors import DataError

Upload = tuple[str, bytes]
"""An image as sent: a name for the answer, and its file bytes."""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPException(413, f"the body has {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is larger than the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def multipart_images(request: Request, body: bytes, max_images: int) -> list[Upload]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=100)
    try:
        images: list[Upload] = []
        for key in ("file", "files"):
            for value in form.getlist(key):
                if not isinstance(value, UploadFile):
                    raise HTTPException(
                        422, f"multipart field `{key}` must be a file upload, not a text value"
                    )
                images.append((value.filename or f"{key}[{len(images)}]", await value.read()))
        if not images:
            fields = ", ".join(f"`{name}`" for name in form) or "none"
            raise HTTPException(422, f"no multipart field `file` or `files` (fields sent: {fields})")
        return images
    finally:
        await form.close()


def json_images(body: bytes) -> list[Upload]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise HTTPException(422, f"the body is not valid JSON ({str(error)[:200]})") from None
    data = payload.get("input_data") if isinstance(payload, dict) else None
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise HTTPException(
            422, 'expected {"input_data": {"columns": ["image"], "data": ["<base64>", ...]}} as the body'
        )
    columns = data.get("columns")
    if columns is not None and columns != ["image"]:
        raise HTTPException(422, f'input_data.columns must be ["image"], got {json.dumps(columns)[:100]}')
    images = []
    for index, row in enumerate(rows):
        # pandas' "split" orientation sends each row as a one-element list.
        value = row[0] if isinstance(row, list) and len(row) == 1 else row
        if not isinstance(value, str):
            raise HTTPException(422, f"input_data.data[{index}] must be a base64 string")
        try:
            images.append((f"data[{index}]", base64.b64decode("".join(value.split()), validate=True)))
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"input_data.data[{index}] is not valid base64") from None
    return images


def check_pixels(images: list[Upload], max_pixels: int, max_request_pixels: int) -> None:
    """413 for an image, or a request, over its pixel limit, read from the headers; 415 for no image."""
    total = 0
    for name, data in images:
        try:
            width, height = image_size_from_header(data, name=name)
        except DataError as error:
            if "decompression bomb" in str(error):
                raise HTTPException(413, f"{name}: refused, too many pixels (decompression bomb?)") from None
            raise HTTPException(
                415, f"{name}: not an image; send JPEG, PNG, BMP, GIF, TIFF or WebP files"
            ) from None
        if width * height > max_pixels:
            raise HTTPException(
                413,
                f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}; downscale it first",
            )
        total += width * height
    if total > max_request_pixels:
        raise HTTPException(
            413,
            f"the {len(images)} images hold {total:,} pixels together, over the limit of "
            f"{max_request_pixels:,} per request; send fewer or smaller images per request",
        )


def decode_all(images: list[Upload], max_pixels: int) -> list[torch.Tensor]:
    """Decode every image (after :func:`check_pixels`); 422 for one that does not decode."""
    decoded = []
    for name, data in images:
        try:
            decoded.append(decode_image_bytes(data, name=name, max_pixels=max_pixels))
        except DataError as error:
            raise HTTPException(422, str(error)) from None
    return decoded
