"""lamina's own drivers pass the conformance kit they ship (lamina.testing.conformance)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfs import loop_fs

from conftest import need_tool
from lamina.drivers.registry import default_registry
from lamina.testing.conformance import ConformanceOptions, assert_conformant

pytestmark = pytest.mark.usefixtures("require_root")


@pytest.mark.parametrize(("driver", "store"), [
    ("copy", False),
    ("copy", True),
    ("overlay", True),
    ("objects", True),
])
def test_builtin_driver(tmp_path: Path, driver: str, store: bool) -> None:
    assert_conformant(default_registry().get(driver), tmp_path / "work",
                      ConformanceOptions(store=store))


def test_objects_driver_without_refresh(tmp_path: Path) -> None:
    assert_conformant(default_registry().get("objects"), tmp_path / "work",
                      ConformanceOptions(repack_refresh=False))


@pytest.fixture
def btrfs_dir(tmp_path: Path) -> Iterator[Path]:
    need_tool("btrfs")
    with loop_fs("btrfs", tmp_path, 256 << 20) as mnt:
        yield mnt


def test_btrfs_driver(btrfs_dir: Path) -> None:
    assert_conformant(default_registry().get("btrfs"), btrfs_dir / "work")


def test_btrfs_driver_without_refresh(btrfs_dir: Path) -> None:
    assert_conformant(default_registry().get("btrfs"), btrfs_dir / "work",
                      ConformanceOptions(repack_refresh=False))


def test_objects_driver_on_btrfs(btrfs_dir: Path) -> None:
    # reflinked files where the filesystem has them; read-only bundles hardlink a farm
    assert_conformant(default_registry().get("objects"), btrfs_dir / "work",
                      ConformanceOptions(repack_refresh=False))


def test_lazy_driver(tmp_path: Path) -> None:
    # serves only when named; reads layer data on demand, so a damaged blob shows up as
    # read errors, not at unpack; a lazy bundle has no --refresh-bundle
    assert_conformant(default_registry().get("lazy"), tmp_path / "work",
                      ConformanceOptions(forced=True, repack_refresh=False,
                                         verifies_on_read=True))
