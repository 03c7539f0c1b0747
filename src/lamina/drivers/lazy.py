"""The ``lazy`` driver: a bundle whose rootfs is a lazy FUSE mount under overlayfs.

``lamina unpack --driver lazy --image LAYOUT:TAG BUNDLE`` (never chosen unless
named: the bundle depends on a daemon and on the layout staying in place)::

    BUNDLE/
    ├── rootfs/         overlayfs: lowerdir = BUNDLE/lower, upper/work below
    ├── lower/          the lazy mount (lamina.lazy): contents fetched on first read
    ├── upper/          everything written in the bundle (what repack reads)
    ├── work/
    ├── config.json
    └── lamina.json     "driver": "lazy", the layout, tag and mounts

``lamina umount BUNDLE`` stops the daemon (overlay first); ``lamina repack``
reads ``upper/`` like the overlay driver.  ``--refresh-bundle`` is not
supported: unpack the repacked image again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lamina.drivers.base import (
    Capabilities,
    ClaimRequest,
    Driver,
    Mount,
    check_capabilities,
    is_root,
    unsupported,
)

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.layer.diff import Change
    from lamina.store import Store

NAME = "lazy"


class LazyDriver(Driver):
    name = NAME

    def __init__(self, req: ClaimRequest | None = None, *,
                 meta: Mapping[str, Any] | None = None) -> None:
        if req is not None:
            super().__init__(req)
        self.meta = dict(meta or {})

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        from lamina import __version__
        from lamina.bundle import (
            METADATA,
            UnpackResult,
            _rmtree_quiet,
            claim_target,
            write_json,
        )
        from lamina.lazy.mount import LazyMountOptions, mount, unmount
        from lamina.oci import runtime
        from lamina.oci.layout import ImageRef
        from lamina.oci.model import Platform
        r = self.req
        assert r.layout is not None
        t0 = time.monotonic()
        bundle = os.path.abspath(r.bundle)
        parent = claim_target(bundle)
        if progress is not None:
            progress.start(sum(c.desc.size for c in r.chain), len(r.chain))
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(bundle)}.lamina-{os.getpid()}-",
                                 dir=parent)
        try:
            os.mkdir(os.path.join(stage, "rootfs"), 0o755)
            os.chmod(stage, 0o711)
            if os.path.isdir(bundle):
                os.rmdir(bundle)
            os.rename(stage, bundle)
        except BaseException:
            _rmtree_quiet(stage)
            raise
        rootfs = os.path.join(bundle, "rootfs")
        try:
            res = mount(LazyMountOptions(
                image=ImageRef(r.layout.path, r.tag), mountpoint=rootfs,
                platform=Platform(r.config.os, r.config.architecture), writable=bundle))
            fd = os.open(res.lower, os.O_RDONLY | os.O_DIRECTORY)
            try:   # the image's /etc/passwd and /etc/group, from the read-only view
                spec = runtime.generate(r.config, fd, rootless=r.rootless, uid_map=r.uid_map,
                                        gid_map=r.gid_map,
                                        image_annotations=r.manifest.annotations)
            finally:
                os.close(fd)
            write_json(os.path.join(bundle, "config.json"), spec)
            mounts = [Mount("fuse.lamina", "lamina-lazy", res.lower, ("ro",)),
                      Mount("overlay", "overlay", rootfs,
                            (f"lowerdir={res.lower}",
                             f"upperdir={os.path.join(bundle, 'upper')}",
                             f"workdir={os.path.join(bundle, 'work')}"))]
            meta = {
                "lamina": __version__, "driver": NAME, "image": r.image,
                "layout": r.layout.path, "tag": r.tag, "manifest": r.manifest.digest,
                "config": r.config.digest, "diff_ids": [c.diff_id for c in r.chain],
                "layers": [c.desc.to_json() for c in r.chain],
                "mounts": [m.to_json() for m in mounts], "daemon": res.pid,
                "options": {"rootless": r.rootless, "uid_map": [str(m) for m in r.uid_map],
                            "gid_map": [str(m) for m in r.gid_map]},
            }
            write_json(os.path.join(bundle, METADATA), meta)
        except BaseException:
            with contextlib.suppress(Exception):
                unmount(rootfs)
            _rmtree_quiet(bundle)
            raise
        self.meta = meta
        if progress is not None:
            for i, c in enumerate(r.chain):
                progress.advance(c.desc.size)
                progress.layer_done(i)
        out = UnpackResult(bundle, r.manifest.digest, r.config.digest, len(r.chain))
        out.entries = res.inodes
        out.driver = NAME
        out.seconds = round(time.monotonic() - t0, 3)
        return out

    def mounts(self) -> list[Mount]:
        return [Mount.from_json(m) for m in self.meta.get("mounts", [])]

    def delta_list(self, bundle: str) -> list[Change] | None:
        from lamina.drivers.overlay import upper_changes
        return upper_changes(os.path.join(bundle, "upper"))

    def delta_root(self, bundle: str) -> str:
        return os.path.join(bundle, "upper")

    def refresh(self, bundle: str) -> None:
        raise unsupported(NAME, "--refresh-bundle",
                          hint="unpack the repacked image into a new bundle")

    def release(self, bundle: str) -> None:
        from lamina.lazy.mount import unmount
        unmount(os.path.join(bundle, "rootfs"))

    def remove(self, bundle: str) -> None:
        from lamina.bundle import _rmtree_quiet
        self.release(bundle)
        _rmtree_quiet(bundle)


class LazyFactory:
    name = NAME
    description = ("the image's tree over FUSE from per-layer indexes, contents fetched on "
                   "first read, overlayfs on top for writes (only when named)")
    capabilities = Capabilities(needs_root=True, rootless_ok=False, needs_store=False,
                                features=("overlay", "fuse"), mounts=True,
                                writes=("bundle", "layout"))

    def check_here(self, store_path: str | None) -> str | None:
        reason = check_capabilities(self.capabilities, store_path)
        if reason:
            return reason
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        try:
            from lamina.lazy import load_pyfuse3
            load_pyfuse3()
        except ImportError:
            return "pyfuse3 is not installed (pip install 'lamina[lazy]')"
        return None if is_root() else "needs root (overlayfs on a FUSE lower)"

    def claim(self, req: ClaimRequest) -> Driver | None:
        if not req.forced:
            return None     # a daemon-backed bundle is chosen, never defaulted to
        if req.layout is None:
            raise unsupported(NAME, "images in a store",
                              hint="name an OCI layout: --image LAYOUT:TAG")
        if req.rootless or req.uid_map or req.gid_map:
            raise unsupported(NAME, "--rootless and id maps")
        return LazyDriver(req)

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        return LazyDriver(meta=meta)


factory = LazyFactory()
