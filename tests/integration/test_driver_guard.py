"""A driver doing what it did not declare is refused at unpack time (drivers.guard)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lamina.bundle import Progress, UnpackResult
from lamina.drivers.base import ClaimRequest, Driver
from lamina.drivers.copy import CopyDriver, CopyFactory
from lamina.drivers.guard import mount_points
from lamina.drivers.registry import Registry
from lamina.drivers.unpack import DriverUnpackOptions, unpack_with_driver
from lamina.errors import EnvironmentError_
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder

pytestmark = pytest.mark.usefixtures("require_root")


class MountsTmpfs(CopyDriver):
    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        res = super().prepare(progress)
        target = os.path.join(self.req.bundle, "rootfs", "scratch")
        os.mkdir(target)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
        return res


class WritesLayout(CopyDriver):
    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        res = super().prepare(progress)
        assert self.req.layout is not None
        with open(os.path.join(self.req.layout.path, "index.json"), "a") as f:
            f.write(" ")
        return res


def registry(driver: type[CopyDriver]) -> Registry:
    class Factory(CopyFactory):
        name = "rogue"

        def claim(self, req: ClaimRequest) -> Driver | None:
            return driver(req)

        def open(self, bundle: str, meta: Mapping[str, Any], store: Any) -> Driver:
            return driver(meta=meta, store=store)

    reg = Registry()
    reg.register("rogue", Factory())
    return reg


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    lay = tmp_path / "layout"
    build_image(str(lay), "t", [TarBuilder().add_dir("etc").add_file("etc/x", b"x\n").build()])
    return lay


@pytest.mark.parametrize(("driver", "message"), [
    (MountsTmpfs, "mounted .*/rootfs/scratch without declaring mounts"),
    (WritesLayout, "wrote into the image's layout .* without declaring it in writes"),
])
def test_undeclared_action_is_refused(tmp_path: Path, layout: Path, driver: type[CopyDriver],
                                      message: str) -> None:
    bundle = tmp_path / "bundle"
    before = mount_points()
    try:
        with pytest.raises(EnvironmentError_, match=f"driver rogue was refused: it {message}"):
            unpack_with_driver(DriverUnpackOptions(image=f"{layout}:t", bundle=str(bundle),
                                                   driver="rogue"), registry=registry(driver))
    finally:
        leftover = [m for m in mount_points() - before if m.startswith(str(tmp_path))]
        for m in leftover:
            subprocess.run(["umount", "-l", m], check=False)
    assert not leftover
    assert not bundle.exists()


def test_honest_driver_passes(tmp_path: Path, layout: Path) -> None:
    res = unpack_with_driver(DriverUnpackOptions(image=f"{layout}:t",
                                                 bundle=str(tmp_path / "b"), driver="copy"))
    assert (tmp_path / "b" / "rootfs" / "etc" / "x").read_bytes() == b"x\n"
    assert res.bundle == str(tmp_path / "b")
