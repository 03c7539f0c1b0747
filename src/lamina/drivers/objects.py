"""The ``objects`` driver: rootfs files made from the store's content objects.

Each layer is applied from its tar-split (headers) with file contents taken
from ``objects/`` (see :mod:`lamina.drivers.materialize`): nothing is
decompressed or hashed, and a file costs no data blocks where it can share
them with the store.

Which placement a bundle gets:

* writable bundle (the default): ``clone``.  ``FICLONE`` shares the
  object's extents copy-on-write on btrfs and xfs (``reflink=1``); the
  rootfs can be written freely.  On a filesystem without reflinks (ext4) the
  bytes are copied, so there it saves the decompression, not the disk.
* ``--read-only`` bundle: ``link``.  Files are hardlinks to a per-layer *link
  farm* (``STORE/extract/objects/<chain id>/``), whose inodes carry the
  entry's mode, owner, mtime and xattrs; every bundle of every image using
  that layer shares them.  Writing such a file in place would change it for
  all of them (and for later unpacks), which is why ``link`` is only used for
  read-only bundles: the runtime config says ``root.readonly``.  Removing a
  farm (``lamina gc``) never breaks a bundle: its links keep the inodes.
* the image annotation (or ``--annotation``) ``org.lamina.objects.placement``
  = ``clone``, ``copy`` or ``link`` overrides the choice (``link`` still
  needs a read-only bundle).

Links and clones need the bundle on the store's filesystem; elsewhere files
are copied (``link`` falls back to ``clone``, which copies).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from lamina.drivers import storebundle
from lamina.drivers.base import (
    Capabilities,
    ChainLayer,
    ClaimRequest,
    Driver,
    Usage,
    check_capabilities,
    unsupported,
)
from lamina.drivers.materialize import (
    Placement,
    PlaceStats,
    StoreRootfsWriter,
    apply_split,
)
from lamina.errors import UsageError
from lamina.layer.extract import ExtractOptions, LayerStats
from lamina.layer.snapshot import row as snapshot_row
from lamina.layer.snapshot import take_snapshot

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.store import Store

NAME = "objects"
PLACEMENT_ANNOTATION = "org.lamina.objects.placement"
PLACEMENTS = ("clone", "copy", "link")


def choose_placement(req: ClaimRequest, same_fs: bool) -> Placement:
    """The placement for *req* (see the module docstring)."""
    want = req.annotations.get(PLACEMENT_ANNOTATION, "")
    if want and want not in PLACEMENTS:
        raise UsageError(f"{PLACEMENT_ANNOTATION}={want!r}: must be one of "
                         + ", ".join(PLACEMENTS))
    if want == "link" and not req.read_only:
        raise unsupported(NAME, "hardlinked files in a writable bundle",
                          hint="writing a hardlinked file would change the store's copy: "
                               "unpack with --read-only, or use clone/copy placement")
    placement = cast(Placement, want or ("link" if req.read_only else "clone"))
    if placement == "link" and not same_fs:
        placement = "clone"
    return placement


class ObjectsDriver(Driver):
    name = NAME

    def __init__(self, req: ClaimRequest | None = None, *,
                 meta: Mapping[str, Any] | None = None, store: Store | None = None) -> None:
        """Made by ``claim`` (a request with a store) or ``open`` (an existing
        bundle's lamina.json, which removal and usage need, not the image)."""
        super().__init__(req, meta=meta, store=store)
        self.place = PlaceStats()
        self._writer: StoreRootfsWriter | None = None
        self._stats = LayerStats()
        self.reused = 0                 # layers whose link farm was already there

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise unsupported(NAME, "preparing a bundle without a store")
        return self.store

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        req = self.req
        t0 = time.monotonic()
        warnings: list[str] = []

        def warn(msg: str) -> None:
            warnings.append(msg)
            if progress is not None:
                progress.warn(msg)

        stage = storebundle.begin(req.bundle)
        try:
            rootfs = os.path.join(stage, "rootfs")
            os.mkdir(rootfs, 0o755)
            same_fs = os.stat(self._store.objects_dir).st_dev == os.stat(stage).st_dev
            placement = choose_placement(req, same_fs)
            opts = ExtractOptions(req.rootless, req.uid_map, req.gid_map, req.keep_dirlinks)
            with self._store.session():
                writer = StoreRootfsWriter(rootfs, opts, self._store.objects_fd, placement,
                                           warn=warn)
                self._writer = writer
                try:
                    if progress is not None:
                        progress.start(sum(c.desc.size for c in req.chain), len(req.chain))
                    for i, layer in enumerate(req.chain):
                        if not self.try_skip(layer):
                            self.extract(layer, i)
                        if progress is not None:
                            progress.advance(layer.desc.size)
                            progress.layer_done(i)
                    snap = take_snapshot(rootfs, writer.hashes)
                    for path, st in writer.finish().items():
                        snap[path] = snapshot_row(path, "d", st, "")
                    self.place = writer.place
                    storebundle.complete(stage, req, NAME, writer.root_fd, list(snap.values()),
                                         {"placement": placement,
                                          "cloned": writer.place.cloned,
                                          "copied": writer.place.copied,
                                          "linked": writer.place.linked})
                finally:
                    self._writer = None
                    writer.close()
        except BaseException:
            storebundle.abort(stage)
            raise
        return storebundle.result(req, NAME, t0, self._stats, self.reused, warnings)

    def extract(self, layer: ChainLayer, index: int) -> None:
        w = self._writer
        assert w is not None, "extract() runs inside prepare()"
        split = self._store.tar_split_path(layer.diff_id)
        if w.placement != "link":
            apply_split(w, split, self._stats)
            return
        # the layer's link farm: built once (under its lock, in staging, renamed when
        # complete); later bundles of any image with this chain link the same inodes
        st = self._store
        with st.extraction_lock(NAME, layer.chain_id):
            ex = st.extraction(NAME, layer.chain_id)
            if ex is not None and os.path.isdir(ex.path):
                self.reused += 1
                w.set_farm(ex.path)
                try:
                    apply_split(w, split, self._stats)
                finally:
                    w.set_farm(None)
                return
            if ex is not None:  # recorded but gone: make it again
                st.remove_extraction(NAME, layer.chain_id)
            with st.stage_extraction(NAME, layer.chain_id) as tmp:
                w.set_farm(tmp)
                try:
                    apply_split(w, split, self._stats)
                finally:
                    w.set_farm(None)

    def usage(self, bundle: str) -> Usage:
        """Linked files belong to the layer's farm (shared): not counted.  Cloned
        files are counted whole, though they share their extents until written
        (telling which extents are shared needs FIEMAP per file)."""
        placement = (self.meta.get(NAME) or {}).get("placement")
        if placement != "link":
            return super().usage(bundle)
        nbytes = inodes = 0
        seen: set[int] = set()
        for root, dirs, files in os.walk(bundle):
            for name in dirs + files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    continue    # a farm inode (or a hardlink to one)
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    inodes += 1
                    nbytes += st.st_blocks * 512
        return Usage(nbytes, inodes)


class ObjectsFactory:
    """Entry point ``objects = "lamina.drivers.objects:ObjectsFactory"``."""

    name = NAME
    description = ("rootfs files are reflinks of store objects (btrfs, xfs), or hardlinks "
                   "for read-only bundles; copies elsewhere")
    capabilities = Capabilities(needs_root=False, rootless_ok=True, needs_store=True,
                                writes=("bundle", "store"))

    def check_here(self, store_path: str | None) -> str | None:
        return check_capabilities(self.capabilities, store_path)

    def claim(self, req: ClaimRequest) -> Driver | None:
        if req.store is None:
            if req.forced:
                raise UsageError("the objects driver unpacks images from a store",
                                 hint="pass --store (the image is imported first)")
            return None
        choose_placement(req, True)     # a bad placement annotation fails before any write
        return ObjectsDriver(req)

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        return ObjectsDriver(meta=meta, store=store)


factory = ObjectsFactory()
