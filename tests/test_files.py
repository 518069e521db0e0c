"""Atomic writes leave either the old file or the new one, never a partial one."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionautoml.files import atomic_path, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_write_keeps_the_old_content_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_directory_replaces_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "dataset"
    with atomic_path(target, directory=True) as temporary:
        (temporary / "a.txt").write_text("a")
    with atomic_path(target, directory=True) as temporary:
        (temporary / "b.txt").write_text("b")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
