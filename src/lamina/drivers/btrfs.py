"""The ``btrfs`` driver: a subvolume snapshot per chain id.

For a store on btrfs, every layer of an image gets an extraction
``STORE/extract/btrfs/<chain id>/`` holding::

    rootfs/         a subvolume: the image's layers up to this one applied
    snapshot        the lamina.snapshot rows of that rootfs (for repack)

Layer *k*'s subvolume is a snapshot of layer *k-1*'s with layer *k* applied
from its tar-split (file contents reflinked from the store's objects, see
:mod:`lamina.drivers.materialize`).  An unpack finds the deepest chain id
that already has one, builds only the layers above it, and makes the bundle's
``rootfs`` a writable snapshot of the top: an image whose layers are all in
the store unpacks in one snapshot, whatever its size.  Snapshots keep inode
numbers and times, so the stored snapshot rows serve the bundle as they are.

Needs root (subvolume creation and deletion) and the bundle on the store's
btrfs filesystem.  Subvolumes are plain directories to ``rmdir`` (Linux
4.18+), so ``lamina gc`` and staging reclaim remove them like any tree;
:func:`delete_tree` does it in one ioctl where it can.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lamina.drivers import storebundle
from lamina.drivers.base import (
    Capabilities,
    ChainLayer,
    ClaimRequest,
    Driver,
    check_capabilities,
    fs_type,
    have_tool,
    unsupported,
)
from lamina.drivers.materialize import StoreRootfsWriter, apply_split
from lamina.errors import EnvironmentError_, UsageError
from lamina.layer.extract import ExtractOptions, LayerStats
from lamina.layer.snapshot import read_snapshot, take_snapshot, write_rows
from lamina.layer.snapshot import row as snapshot_row
from lamina.store.locking import rmtree_all

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.store import Store

NAME = "btrfs"
SUBVOL = "rootfs"
SNAPSHOT = "snapshot"
_ROOT_INO = 256             # the inode number of every subvolume's root directory


# -- subvolume helpers (the btrfs program: stable interface, clear errors) ----------------

def _btrfs(*args: str) -> None:
    try:
        r = subprocess.run(["btrfs", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise EnvironmentError_("the btrfs program is not installed",
                                hint="install btrfs-progs") from None
    if r.returncode != 0:
        raise EnvironmentError_(f"btrfs {' '.join(args)}: {r.stderr.strip() or r.stdout}",
                                hint="the store and the bundle must be on one btrfs "
                                     "filesystem, and lamina must run as root")


def is_subvolume(path: str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_ino == _ROOT_INO and fs_type(path) == "btrfs"


def create_subvolume(path: str) -> None:
    _btrfs("subvolume", "create", path)


def snapshot_subvolume(src: str, dst: str) -> None:
    """A writable snapshot of the subvolume *src* at *dst* (which must not exist)."""
    _btrfs("subvolume", "snapshot", src, dst)


def delete_subvolume(path: str) -> None:
    _btrfs("subvolume", "delete", path)


def delete_tree(path: str) -> None:
    """Remove *path*: its subvolumes with one ``subvolume delete`` each, the rest
    file by file.  Missing is fine."""
    if not os.path.lexists(path):
        return
    sub = os.path.join(path, SUBVOL)
    for p in (path, sub):
        if is_subvolume(p):
            with contextlib.suppress(EnvironmentError_):
                delete_subvolume(p)
    rmtree_all(path)


def mount_source(path: str) -> str:
    """The device of the mount holding *path* (subvolumes of one filesystem have
    different st_dev, so st_dev cannot tell "same filesystem")."""
    p = os.path.realpath(path)
    best, src = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 2:
            continue
        mnt = parts[4].replace("\\040", " ")
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, src = mnt, f"{rparts[1]}:{parts[2]}"   # device and major:minor
    return src


# -- the driver ---------------------------------------------------------------------------

class BtrfsDriver(Driver):
    name = NAME

    def __init__(self, req: ClaimRequest | None = None, *,
                 meta: Mapping[str, Any] | None = None, store: Store | None = None) -> None:
        """Made by ``claim`` (a request with a store) or ``open`` (an existing
        bundle's lamina.json, which removal and usage need, not the image)."""
        super().__init__(req, meta=meta, store=store)
        self.built: list[str] = []      # chain ids whose subvolume this unpack made
        self._stats = LayerStats()

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise unsupported(NAME, "preparing a bundle without a store")
        return self.store

    def _path(self, chain_id: str) -> str | None:
        ex = self._store.extraction(NAME, chain_id)
        if ex is None:
            return None
        if not os.path.isfile(os.path.join(ex.path, SNAPSHOT)):
            return None
        return ex.path

    def try_skip(self, layer: ChainLayer) -> bool:
        return self._path(layer.chain_id) is not None

    def extract(self, layer: ChainLayer, index: int) -> None:
        """Build chain *index*'s subvolume from the one below it (which exists)."""
        st = self._store
        with st.extraction_lock(NAME, layer.chain_id):
            if self._path(layer.chain_id) is not None:
                return  # another unpack built it while we waited
            if st.extraction(NAME, layer.chain_id) is not None:   # recorded but broken
                st.remove_extraction(NAME, layer.chain_id, delete_tree)
            parent = self._path(self.req.chain[index - 1].chain_id) if index else None
            with st.stage_extraction(NAME, layer.chain_id) as tmp:
                sub = os.path.join(tmp, SUBVOL)
                try:
                    self._build(layer, parent, sub, tmp)
                except BaseException:
                    delete_tree(sub)
                    raise
        self.built.append(layer.chain_id)

    def _build(self, layer: ChainLayer, parent: str | None, sub: str, tmp: str) -> None:
        hashes: dict[str, bytes] = {}
        if parent is None:
            create_subvolume(sub)
            os.chmod(sub, 0o755)
        else:
            snapshot_subvolume(os.path.join(parent, SUBVOL), sub)
            with open(os.path.join(parent, SNAPSHOT), "rb") as f:
                for r in read_snapshot(f):
                    if r[1] == "f" and isinstance(r[9], bytes) and r[9]:
                        hashes[str(r[0])] = r[9]
        opts = ExtractOptions(keep_dirlinks=self.req.keep_dirlinks)
        w = StoreRootfsWriter(sub, opts, self._store.objects_fd, "clone",
                              keep_lower_dirs=parent is not None)
        try:
            w.hashes = hashes
            apply_split(w, self._store.tar_split_path(layer.diff_id), self._stats)
            snap = take_snapshot(sub, w.hashes)
            for path, stt in w.finish().items():
                snap[path] = snapshot_row(path, "d", stt, "")
        finally:
            w.close()
        with open(os.path.join(tmp, SNAPSHOT), "wb") as f:
            write_rows(list(snap.values()), f)

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        req = self.req
        t0 = time.monotonic()
        chain = req.chain
        if not chain:
            raise UsageError("the btrfs driver needs an image with at least one layer")
        stage = storebundle.begin(req.bundle, delete_tree)
        try:
            with self._store.session():
                # the deepest chain id that already has a subvolume is reused
                have = next((i for i in range(len(chain) - 1, -1, -1)
                             if self.try_skip(chain[i])), -1)
                if progress is not None:
                    progress.start(sum(c.desc.size for c in chain[have + 1:]), len(chain))
                for i in range(have + 1, len(chain)):
                    self.extract(chain[i], i)
                    if progress is not None:
                        progress.advance(chain[i].desc.size)
                        progress.layer_done(i)
                top = self._path(chain[-1].chain_id)
                if top is None:
                    raise EnvironmentError_(f"btrfs extraction of {chain[-1].chain_id} "
                                            "vanished during the unpack",
                                            hint="a concurrent 'lamina gc'? unpack again")
                rootfs = os.path.join(stage, "rootfs")
                snapshot_subvolume(os.path.join(top, SUBVOL), rootfs)
                with open(os.path.join(top, SNAPSHOT), "rb") as f:
                    rows = read_snapshot(f)
            fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                storebundle.complete(stage, req, NAME, fd, rows,
                                     {"reused": have + 1, "built": len(chain) - have - 1})
            finally:
                os.close(fd)
        except BaseException:
            delete_tree(stage)
            raise
        return storebundle.result(req, NAME, t0, self._stats, have + 1, [])

    def remove(self, bundle: str) -> None:
        self.release(bundle)
        delete_tree(bundle)


def _same_fs(a: str, b: str) -> bool:
    sa, sb = mount_source(a), mount_source(b)
    return bool(sa) and sa.split(":")[0] == sb.split(":")[0]


class BtrfsFactory:
    """Entry point ``btrfs = "lamina.drivers.btrfs:factory"``."""

    name = NAME
    description = ("a btrfs subvolume per chain id, the deepest existing one reused; "
                   "bundles are writable snapshots")
    capabilities = Capabilities(needs_root=True, rootless_ok=False, needs_store=True,
                                filesystems=("btrfs",), tools=("btrfs",),
                                writes=("bundle", "store"))

    def check_here(self, store_path: str | None) -> str | None:
        return check_capabilities(self.capabilities, store_path)

    def claim(self, req: ClaimRequest) -> Driver | None:
        why = self._why_not(req)
        if why is None:
            return BtrfsDriver(req)
        if req.forced:
            raise UsageError(f"the btrfs driver cannot unpack this: {why}",
                             hint="choose another driver with --driver")
        return None

    def _why_not(self, req: ClaimRequest) -> str | None:
        if req.store is None:
            return "it needs a store (--store) on btrfs"
        if req.rootless or req.uid_map or req.gid_map:
            return "rootless and id-mapped unpacks are not supported"
        if not have_tool("btrfs"):
            return "the btrfs program is not installed"
        if fs_type(req.store.path) != "btrfs":
            return f"the store {req.store.path} is not on btrfs"
        parent = os.path.dirname(req.bundle)
        if not _same_fs(req.store.path, parent):
            return f"the bundle {req.bundle} is not on the store's btrfs filesystem"
        return None

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        return BtrfsDriver(meta=meta, store=store)

    @staticmethod
    def remover(path: str) -> None:
        """For ``Store.gc(removers={"btrfs": ...})``: delete an extraction."""
        delete_tree(path)


factory = BtrfsFactory()
