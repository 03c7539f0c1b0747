"""Filesystems on loop devices, made by the tests that need a feature (reflinks,
btrfs subvolumes) and always unmounted afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_tool

MiB = 1 << 20


def mkfs_command(kind: str, image: Path) -> list[str]:
    if kind == "btrfs":
        return [need_tool("mkfs.btrfs"), "-q", "-f", str(image)]
    if kind == "xfs":
        return [need_tool("mkfs.xfs"), "-q", "-f", "-m", "reflink=1", str(image)]
    if kind == "ext4":
        return [need_tool("mkfs.ext4"), "-q", "-F", str(image)]
    raise ValueError(kind)


@contextlib.contextmanager
def loop_fs(kind: str, tmp_path: Path, size: int = 400 * MiB) -> Iterator[Path]:
    """A fresh *kind* filesystem (btrfs, xfs with reflink=1, ext4) mounted in *tmp_path*.

    Skips without root; fails under CI when the mount is impossible.  On exit it
    unmounts recursively (a failed test may leave an overlay bundle inside); the
    loop device goes with it (``mount -o loop`` sets autoclear).
    """
    if os.geteuid() != 0:
        pytest.skip("needs root (loop mounts)")
    image = tmp_path / f"{kind}.img"
    with open(image, "wb") as f:
        f.truncate(size)            # sparse; xfs wants >= 300 MiB
    subprocess.run(mkfs_command(kind, image), check=True, capture_output=True)
    mnt = tmp_path / f"mnt-{kind}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot loop-mount {kind}: {r.stderr}")
        pytest.skip(f"cannot loop-mount {kind}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", "-R", str(mnt)], check=False, capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-R", "-l", str(mnt)], check=False,
                           capture_output=True)


def shared_extents(path: Path) -> bool:
    """Whether every extent of *path* is shared with another file (reflinked)."""
    out = subprocess.run([need_tool("filefrag"), "-v", str(path)], check=True,
                         capture_output=True, text=True).stdout
    extents = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit() and ":" in ln]
    return bool(extents) and all("shared" in ln for ln in extents)
