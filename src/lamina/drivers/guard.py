"""Hold a driver to its declared capabilities while it prepares a bundle.

What can be checked cheaply after the fact is checked: new mounts below the
bundle from a driver that does not declare ``mounts``, and a changed OCI layout
(its ``index.json`` or blob directory) from a driver that does not declare
``layout`` among its ``writes``.  Such a driver is refused: its bundle is
removed and the unpack fails with an error naming the driver.  (Network use and
writes elsewhere on the host cannot be seen without tracing; the conformance
kit, :mod:`lamina.testing.conformance`, checks more in tests.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lamina.errors import EnvironmentError_

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.drivers.base import ClaimRequest, Driver, DriverFactory

_Stamp = tuple[int, int, int]


def mount_points() -> set[str]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return {line.split()[4].replace("\\040", " ") for line in f if line.strip()}
    except OSError:
        return set()


def _stamp(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _layout_stamps(req: ClaimRequest) -> list[_Stamp | None]:
    if req.layout is None:
        return []
    return [_stamp(os.path.join(req.layout.path, p)) for p in
            ("index.json", "oci-layout", os.path.join("blobs", "sha256"))]


def prepare_checked(factory: DriverFactory, driver: Driver, req: ClaimRequest,
                    progress: Progress | None = None) -> UnpackResult:
    """``driver.prepare(progress)``, refused when it did what it did not declare."""
    caps = factory.capabilities
    mounts0 = mount_points() if not caps.mounts else set()
    layout0 = _layout_stamps(req) if "layout" not in caps.writes else []
    res = driver.prepare(progress)
    broken: list[str] = []
    if not caps.mounts:
        new = sorted(m for m in mount_points() - mounts0
                     if m == req.bundle or m.startswith(req.bundle + "/"))
        if new:
            broken.append("mounted " + ", ".join(new) + " without declaring mounts")
    if layout0 and _layout_stamps(req) != layout0:
        broken.append(f"wrote into the image's layout {req.layout.path if req.layout else ''} "
                      "without declaring it in writes")
    if broken:
        _undo(driver, req.bundle, mounts0)
        raise EnvironmentError_(
            f"driver {factory.name} was refused: it " + "; ".join(broken),
            hint="the bundle was removed; fix the driver's capabilities or choose "
                 "another with --driver")
    return res


def _undo(driver: Driver, bundle: str, mounts0: set[str]) -> None:
    import contextlib
    import shutil
    import subprocess
    # undeclared mounts first (deepest first), then the driver's own removal
    for m in sorted((m for m in mount_points() - mounts0
                     if m == bundle or m.startswith(bundle + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)
    with contextlib.suppress(Exception):
        driver.remove(bundle)
    shutil.rmtree(bundle, ignore_errors=True)
