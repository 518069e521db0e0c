"""The one guarded image decoder: bad bytes are a DataError naming the file, never a crashed process."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RACCOON_DIR, make_voc_dataset
from PIL import Image

from visionautoml.data.images import (
    MAX_PIXELS,
    check_image,
    decode_image_bytes,
    decode_image_file,
    preview_image,
    probe_image,
    verify_image_file,
)
from visionautoml.errors import DataError


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def short_idat_png() -> bytes:
    """Issue 11's 69 bytes: a valid IHDR for 10x10 RGB, an IDAT of 100 zero bytes compressed, IEND.

    10 rows of 1 + 30 bytes need 310 bytes of pixel data; libpng says "Not enough image
    data" and torchvision's native decoder takes the process down with SIGSEGV.
    """
    header = struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + png_chunk(b"IEND", b"")
    )


def png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_the_69_byte_png_is_a_data_error_in_a_process_that_lives(tmp_path: Path) -> None:
    data = short_idat_png()
    assert len(data) == 69
    (tmp_path / "short.png").write_bytes(data)
    script = (
        "import sys\n"
        "from visionautoml.data.images import decode_image_bytes, decode_image_file\n"
        "from visionautoml.errors import DataError\n"
        "for decode in (lambda: decode_image_file(sys.argv[1]),"
        " lambda: decode_image_bytes(open(sys.argv[1], 'rb').read(), name='short.png')):\n"
        "    try:\n"
        "        decode()\n"
        "    except DataError as error:\n"
        "        print('DataError:', error)\n"
        "    else:\n"
        "        sys.exit('decoded a broken image')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "short.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"exit {done.returncode} (a negative code is a signal): {done.stderr}"
    assert done.stdout.count("DataError: ") == 2 and "short.png" in done.stdout
    assert "truncated or corrupt" in done.stdout


def test_convert_and_verify_refuse_the_69_byte_png(tmp_path: Path) -> None:
    (tmp_path / "short.png").write_bytes(short_idat_png())
    with pytest.raises(DataError, match=r"short\.png: cannot decode the image"):
        verify_image_file(tmp_path / "short.png")
    with pytest.raises(DataError, match=r"short\.png"):
        check_image(tmp_path / "short.png")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"hello, I am a text file\n", "not an image"),
        (None, "cannot decode"),  # a JPEG cut in half
    ],
    ids=["zero bytes", "text named .jpg", "truncated JPEG"],
)
def test_verify_names_the_file_of_an_image_that_is_no_image(tmp_path: Path, content, message) -> None:
    path = tmp_path / "bad.jpg"
    data = jpeg() if content is None else content
    path.write_bytes(data[: len(data) // 2] if content is None else data)
    with pytest.raises(DataError, match=rf"bad\.jpg: .*{message}"):
        verify_image_file(path)


def test_verify_accepts_complete_images_and_trailing_bytes_after_a_jpeg(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "trailer.jpg").write_bytes(jpeg() + b"camera maker's trailer")
    big = io.BytesIO()
    Image.effect_noise((900, 700), 60).convert("RGB").save(big, "JPEG", quality=100)  # over 128 KiB
    assert len(big.getvalue()) > 2 * 65536
    (tmp_path / "big.jpg").write_bytes(big.getvalue())
    (tmp_path / "big-cut.jpg").write_bytes(big.getvalue()[:-5000])
    png = io.BytesIO()
    Image.new("RGB", (5, 4)).save(png, "PNG")
    (tmp_path / "a.png").write_bytes(png.getvalue())
    for name in ("a.jpg", "trailer.jpg", "big.jpg", "a.png"):
        verify_image_file(tmp_path / name)
    with pytest.raises(DataError, match=r"big-cut\.jpg"):
        verify_image_file(tmp_path / "big-cut.jpg")


def test_pixel_limits_are_read_from_the_header_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "huge.png").write_bytes(png_claiming(30_000, 30_000))
    for check in (verify_image_file, check_image, decode_image_file, lambda path: preview_image(path, 320)):
        with pytest.raises(DataError, match=r"huge\.png: refused"):
            check(tmp_path / "huge.png")
    within = png_claiming(10_000, 8_000)  # exactly MAX_PIXELS claims, and no pixel data
    assert MAX_PIXELS == 10_000 * 8_000
    with pytest.raises(DataError, match="cannot decode"):
        decode_image_bytes(within, name="within.png")
    assert probe_image(_write(tmp_path / "ok.png", png_claiming(7, 5))).width == 7


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_deep_grey_is_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    values = np.full((4, 6), 40_000, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = decode_image_file(tmp_path / "deep.png")
    assert image.shape == (3, 4, 6) and image.dtype == torch.uint8
    assert image.unique().tolist() == [40_000 >> 8]


def test_preview_is_upright_small_and_rgb(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 800x600, displayed 600x800
    Image.effect_noise((800, 600), 30).convert("RGB").save(tmp_path / "r.jpg", exif=exif.tobytes())
    preview = preview_image(tmp_path / "r.jpg", 200)
    assert preview.mode == "RGB" and preview.size == (150, 200)


def test_decoding_the_raccoon_jpegs_gives_torchvisions_pixels() -> None:
    """Pillow decodes as torchvision's native decoder did: switching decoders changed no pixel."""
    if not (RACCOON_DIR / "images").is_dir():
        pytest.skip(f"real dataset not found at {RACCOON_DIR}")
    from torchvision.io import ImageReadMode, decode_image  # trusted files only: the raccoon set

    for path in sorted((RACCOON_DIR / "images").glob("*.jpg"))[:40]:
        data = path.read_bytes()
        native = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        ours = decode_image_bytes(data, name=path.name)
        assert ours.is_contiguous() and torch.equal(ours, native), path.name


def test_convert_names_each_unusable_image(tmp_path: Path) -> None:
    from visionautoml.data.convert import convert

    root = make_voc_dataset(tmp_path / "voc", n_images=4)
    images = root / "images"
    (images / "img-000.jpg").write_bytes(b"")
    (images / "img-001.jpg").write_text("not a picture")
    (images / "img-002.jpg").write_bytes((images / "img-002.jpg").read_bytes()[:200])
    with pytest.raises(DataError) as raised:
        convert(root, tmp_path / "out", "jsonl")
    message = str(raised.value)
    assert "3 error(s)" in message
    for name in ("img-000.jpg", "img-001.jpg", "img-002.jpg"):
        assert name in message
    assert not (tmp_path / "out" / "train_annotations.jsonl").exists()
    result = convert(root, tmp_path / "out", "jsonl", drop_invalid=True)
    assert result.train_images == 1 and result.summary["skipped_images"] == 3
