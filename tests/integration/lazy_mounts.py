"""Mount bookkeeping shared by the lazy mount tests (test_lazy_mount, test_lazy_remote):
no test module may leave a lazy mount behind, and every mount point a test makes is
unmounted after it, even when the test failed half-way."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_lamina


def lamina_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [ln for ln in f if "lamina-lazy" in ln or "fuse.lamina" in ln]


def guard_lazy_mounts() -> Iterator[None]:
    """The body of each lazy test module's autouse fixture: skips the module without root
    or /dev/fuse; after it, unmounts the lazy mounts it added, then fails if there were any."""
    if os.geteuid() != 0:
        pytest.skip("lazy mounts are tested as root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    before = lamina_mounts()
    yield
    left = [m for m in lamina_mounts() if m not in before]
    for m in left:  # clean up, then fail: a test leaked a mount
        subprocess.run(["umount", "-l", m.split()[1]], check=False)
    assert not left, f"leftover lazy mounts: {left}"


def unmount_all(points: list[Path], env: dict[str, str]) -> None:
    """The finalizer of a test's mount points (the ``mounted`` fixtures)."""
    for p in points:
        run_lamina(["umount", str(p)], env=env)     # no-op when already unmounted
        with open("/proc/self/mounts") as f:   # a dead FUSE server defeats ismount()
            if any(line.split()[1] == str(p) for line in f):
                subprocess.run(["umount", "-l", str(p)], check=False)


def unmount(mnt: Path, env: dict[str, str]) -> None:
    """`lamina umount MNT`, which must succeed and leave nothing mounted there."""
    r = run_lamina(["umount", str(mnt)], env=env)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt)
