"""The licence fence: nothing the project depends on (its whole installed tree) is GPL-family or restricted.

Users ship what they train with this project inside their own products, so a copyleft
dependency (AGPL, GPL, LGPL: Ultralytics YOLO, psycopg2 ...) or code and weights that need an
account or forbid commercial use would be their problem. The licence is read from each
distribution's metadata (``License-Expression``, ``License``, classifiers), and from its
licence file where the metadata says nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re

import pytest
from packaging.requirements import Requirement

COPYLEFT = re.compile(r"\b(A|L)?GPL|General Public License|Affero", re.IGNORECASE)
RESTRICTED = re.compile(
    r"non-?commercial|\bCC-BY-NC|research use only|requires? (an )?account", re.IGNORECASE
)
PERMISSIVE = re.compile(
    r"\bMIT\b|\bBSD\b|Apache|\bISC\b|PSF|Python Software Foundation|MPL-2\.0|Mozilla Public|Unlicense"
    r"|\bHPND\b|FreeBSD|Permission is hereby granted, free of charge"
    r"|Redistribution and use in source and binary forms",
    re.IGNORECASE,
)
NVIDIA_RUNTIME = re.compile(r"^(nvidia-.*|cuda-toolkit|cuda-bindings|cuda-pathfinder|triton)$")
"""CUDA libraries of torch's CUDA build: NVIDIA's redistributable runtime, installed from PyPI, no account."""
REVIEWED = {
    "matplotlib": "PSF-style matplotlib licence (BSD-compatible)",
}
"""Distributions whose licence text the patterns do not read, checked by hand (name -> what it is)."""


def dependency_tree(
    name: str = "visionautoml", extras: tuple[str, ...] = ("all",)
) -> dict[str, metadata.Distribution]:
    """Every installed distribution the project needs at run time, its ``extras`` included, recursively.

    scripts/setup.sh installs pixeltable-yolox without its own requirement list, so it is a root too.
    """
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def visit(requirement: str, extras: tuple[str, ...]) -> None:
        try:
            dist = metadata.distribution(requirement)
        except metadata.PackageNotFoundError:
            return  # an optional requirement that is not installed ships nothing
        key = dist.metadata["Name"].lower().replace("_", "-")
        if (key, extras) in seen:
            return
        seen.add((key, extras))
        found[key] = dist
        for text in dist.requires or []:
            needed = Requirement(text)
            if needed.marker is not None and not any(
                needed.marker.evaluate({"extra": extra}) for extra in (extras or ("",))
            ):
                continue
            visit(needed.name, tuple(needed.extras))

    visit(name, extras)
    visit("pixeltable-yolox", ())
    return found


def licence_text(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    parts = [meta.get("License-Expression") or "", (meta.get("License") or "")[:300]]
    parts += [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if not PERMISSIVE.search(" ".join(parts)) and not COPYLEFT.search(" ".join(parts)):
        for file in dist.files or []:
            if re.search(r"(LICEN[CS]E|COPYING)", file.name, re.IGNORECASE):
                parts.append((dist.locate_file(file).read_text(encoding="utf-8", errors="replace"))[:3000])
                break
    return " | ".join(part for part in parts if part)


def verdict(name: str, text: str) -> str | None:
    """Why ``name`` may not be a dependency, or None when it may."""
    if NVIDIA_RUNTIME.match(name) or name in REVIEWED:
        return None
    if RESTRICTED.search(text):
        return f"restricted licence ({RESTRICTED.search(text).group(0)})"
    alternatives = re.split(r"\s+OR\s+", text)
    if COPYLEFT.search(text) and not any(
        PERMISSIVE.search(a) and not COPYLEFT.search(a) for a in alternatives
    ):
        return f"copyleft licence ({COPYLEFT.search(text).group(0)})"
    if not PERMISSIVE.search(text):
        return f"licence not recognised as permissive: {text[:80]!r}; review it and add it to REVIEWED"
    return None


def test_every_dependency_is_permissively_licensed():
    tree = dependency_tree()
    assert {"torch", "mlflow", "ray", "pixeltable-yolox"} <= set(tree)  # the walk reaches the deep ones
    refused = {name: why for name, dist in tree.items() if (why := verdict(name, licence_text(dist)))}
    assert refused == {}


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("AGPL-3.0", True),  # Ultralytics
        ("License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)", True),  # psycopg2
        ("LGPL-2.1-or-later OR MIT", False),
        ("CC-BY-NC-4.0", True),
        ("Apache-2.0", False),
        ("Some licence of our own", True),
    ],
)
def test_the_fence_refuses_what_it_must(text, refused):
    assert (verdict("some-package", text) is not None) is refused
