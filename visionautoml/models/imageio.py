"""Moved to :mod:`visionautoml.data.images`; this re-export goes once ``training/plots.py`` imports from there."""

from visionautoml.data.images import MAX_PIXELS, decode_image_bytes, decode_image_file, image_size_from_header

__all__ = ["MAX_PIXELS", "decode_image_bytes", "decode_image_file", "image_size_from_header"]
