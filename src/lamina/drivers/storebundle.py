"""Building a bundle from a stored image: staging, records, the atomic rename.

Shared by the drivers that make ``rootfs`` from the store (``objects``,
``btrfs``).  The bundle is built in a hidden sibling ``.NAME.lamina-PID-XXXX``
(the name ``lamina unpack`` uses, so a killed unpack's leftovers are reclaimed
by the next one) and renamed into place only when complete.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from lamina import __version__
from lamina.bundle import (
    METADATA,
    SNAPSHOT,
    UnpackResult,
    _rmtree_quiet,
    claim_target,
    write_json,
)
from lamina.drivers.base import ClaimRequest
from lamina.layer.extract import LayerStats
from lamina.layer.snapshot import write_rows
from lamina.oci import runtime


def begin(bundle: str, cleanup: Callable[[str], None] | None = None) -> str:
    """Check the target and make the staging directory (returned; 0700, empty)."""
    parent = claim_target(bundle, None if cleanup is None else (
        lambda p, n: _reclaim_with(p, n, cleanup)))
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(bundle)}.lamina-{os.getpid()}-",
                             dir=parent)
    os.chmod(stage, 0o700)
    return stage


def _reclaim_with(parent: str, name: str, cleanup: Callable[[str], None]) -> None:
    # a driver whose staging holds things rmtree cannot remove (subvolumes) goes first
    prefix = f".{name}.lamina-"
    for e in os.listdir(parent):
        if not e.startswith(prefix):
            continue
        pid_s = e[len(prefix):].partition("-")[0]
        if pid_s.isdigit() and not _alive(int(pid_s)):
            cleanup(os.path.join(parent, e))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def complete(stage: str, req: ClaimRequest, driver: str, rootfs_fd: int,
             snapshot: list[tuple[object, ...]], extra: Mapping[str, Any]) -> None:
    """Write config.json, lamina.snapshot and lamina.json into *stage*, rename it to
    ``req.bundle``.  *rootfs_fd* is the finished rootfs (for the user lookup)."""
    spec = runtime.generate(req.config, rootfs_fd, rootless=req.rootless,
                            uid_map=req.uid_map, gid_map=req.gid_map,
                            image_annotations=dict(req.manifest.annotations))
    if req.read_only:
        spec.setdefault("root", {})["readonly"] = True
    write_json(os.path.join(stage, "config.json"), spec)
    with open(os.path.join(stage, SNAPSHOT), "wb") as f:
        write_rows(snapshot, f)
    meta = {
        "lamina": __version__,
        "driver": driver,
        "layout": req.layout.path if req.layout is not None else "",
        "tag": req.tag,
        "image": req.image,
        "store": req.store.path if req.store is not None else "",
        "manifest": req.manifest.digest,
        "config": req.config.digest,
        "diff_ids": [c.diff_id for c in req.chain],
        "chain_ids": [c.chain_id for c in req.chain],
        "layers": [c.desc.to_json() for c in req.chain],
        "read_only": req.read_only,
        "options": {"rootless": req.rootless, "keep_dirlinks": req.keep_dirlinks,
                    "uid_map": [str(m) for m in req.uid_map],
                    "gid_map": [str(m) for m in req.gid_map]},
        driver: dict(extra),
    }
    write_json(os.path.join(stage, METADATA), meta)
    os.chmod(stage, 0o700 if req.rootless else 0o711)
    if os.path.isdir(req.bundle):
        os.rmdir(req.bundle)  # the empty directory the caller gave us
    os.rename(stage, req.bundle)


def abort(stage: str) -> None:
    _rmtree_quiet(stage)


def result(req: ClaimRequest, driver: str, t0: float, stats: LayerStats, reused: int,
           warnings: list[str]) -> UnpackResult:
    return UnpackResult(req.bundle, req.manifest.digest, req.config.digest, len(req.chain),
                        stats.entries, stats.files, stats.bytes, stats.whiteouts,
                        round(time.monotonic() - t0, 3), warnings, driver=driver,
                        reused=reused)
