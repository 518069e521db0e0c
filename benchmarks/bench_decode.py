"""Decoding the raccoon JPEGs: the guarded decoder (Pillow alone) against the ways to keep torchvision's.

torchvision's native decoder crashes the process (SIGSEGV) on a 69-byte PNG whose IDAT
is short, so it may only see bytes Pillow has checked. Pillow's ``verify()`` does not
catch that file (it checks chunk CRCs, not pixel data) and does nothing for a JPEG, so a
real check is a full Pillow decode, and the native decoder after it decodes every image
twice. This measures, per image, single-threaded, in the same process, runs alternated:

- torchvision alone (unsafe; the floor),
- Pillow ``verify()`` then torchvision (fast, but does not protect),
- a full Pillow decode then torchvision (safe, two decodes),
- ``decode_image_bytes`` (Pillow alone, what every command uses).

    .venv/bin/python benchmarks/bench_decode.py [--images DIR] [--repeat 7]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "raccoon" / "images"


def contenders() -> dict[str, Callable[[bytes], object]]:
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from visionautoml.data.images import decode_image_bytes

    def native(data: bytes) -> torch.Tensor:
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_image(tensor, mode=ImageReadMode.RGB, apply_exif_orientation=True)

    def verify_then_native(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        return native(data)

    def load_then_native(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return native(data)

    return {
        "torchvision alone (unsafe)": native,
        "Pillow verify + torchvision": verify_then_native,
        "Pillow load + torchvision": load_then_native,
        "decode_image_bytes (Pillow)": lambda data: decode_image_bytes(data, name="bench"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    files = sorted(args.images.glob("*.jpg"))
    if not files:
        sys.exit(f"no JPEG files in {args.images}")
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = [path.read_bytes() for path in files]
    runs: dict[str, list[float]] = {name: [] for name in contenders()}
    decoders = contenders()
    first = decoders["torchvision alone (unsafe)"]
    same = all(torch.equal(first(item), decoders["decode_image_bytes (Pillow)"](item)) for item in data)
    print(f"load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for attempt in range(args.repeat):
        order = list(decoders.items())
        for name, decode in order if attempt % 2 == 0 else reversed(order):
            start = time.process_time()
            for item in data:
                decode(item)
            runs[name].append((time.process_time() - start) / len(data) * 1000)
    print(f"\n{len(data)} JPEGs from {args.images}, CPU ms per image, median of {args.repeat} (min)\n")
    for name, times in runs.items():
        print(f"{name:<30} {statistics.median(times):6.3f}  ({min(times):.3f})")
    print(f"\nsame pixels from Pillow and torchvision: {same}")
    print(f"load average after: {os.getloadavg()[0]:.1f} (2 cores)")


if __name__ == "__main__":
    main()
