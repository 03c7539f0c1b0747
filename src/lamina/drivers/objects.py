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
  Without reflinks (ext4) a farm inode is the store object's own inode where
  nothing else links it (see :mod:`lamina.drivers.materialize`): the data is
  then stored once for the store and all its read-only bundles.
* the image annotation (or ``--annotation``) ``org.lamina.objects.placement``
  = ``clone``, ``copy`` or ``link`` overrides the choice (``link`` still
  needs a read-only bundle).

Links and clones need the bundle on the store's filesystem; elsewhere files
are copied (``link`` falls back to ``clone``, which copies).

The small layer right above a replayed record is read first: what its
whiteouts would remove again at once (an opaque directory's lower content) is
not replayed (:func:`~lamina.drivers.materialize.prune_hidden`).

A small layer's missing link farm (a tar-split of at most :data:`PREBUILD_MAX`
bytes) is built from its tar-split alone before anything is written to the
rootfs (a farm does not depend on the tree below it): committing a farm
syncs the filesystem, which after a replay would also flush the tens of
thousands of entries just made in the bundle.  The layer is then applied
like any layer whose farm exists.

Tree records (with the compiled fast path): after a layer, the tree built so
far is recorded for its chain id (``STORE/extract/objects-tree/<chain id>/``,
one file per option set: placement kind, rootless, id maps, keep-dirlinks), once
per chain, when at least :data:`RECORD_MIN` entries were applied since the
deepest record (a small layer on a recorded prefix is applied again instead).
A later unpack replays the record of the longest recorded prefix of its chain
(:meth:`StoreRootfsWriter.replay`) and applies only the layers above it from
their tar-splits: an image whose lower layers were unpacked before reads no
tar-split for them.  Records are a cache: checksummed, made again when damaged,
removed by ``lamina gc`` with their chain.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
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
    RecordEntry,
    StoreRootfsWriter,
    TreeRecord,
    apply_split,
    decode_record,
    encode_record,
    prune_hidden,
    record_tree,
    records_enabled,
    split_entries,
    split_reader,
)
from lamina.errors import LaminaError, UsageError
from lamina.layer.extract import ExtractOptions, LayerStats, Warn
from lamina.layer.snapshot import row as snapshot_row
from lamina.layer.snapshot import take_snapshot
from lamina.stream.stored import plain_size_within

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.store import Store

NAME = "objects"
TREES = "objects-tree"      # the extraction namespace of tree records
RECORD_MIN = 1000           # entries applied above the deepest record before a new one
PREBUILD_MAX = 256 << 10    # tar-split stream bytes up to which a missing farm is built first
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


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
        self._prebuilt: set[int] = set()    # layers whose farm this unpack built first

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise unsupported(NAME, "preparing a bundle without a store")
        return self.store

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        # a record, the hashes and the snapshot are 100,000s of small tuples and no
        # reference cycles: the collector's full passes over them are pure cost
        with _gc_paused():
            return self._prepare(progress)

    def _prepare(self, progress: Progress | None) -> UnpackResult:
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
                    if placement == "link":
                        self._prebuild_farms()
                    self._store.checkpoint()    # not at close, after the tree is written
                    key = self._tree_key(writer) if records_enabled() else None
                    done = self._replay(key, warn) if key is not None else 0
                    writer = self._writer   # a failed replay starts over with a new one
                    n = len(req.chain)
                    since = 0       # entries applied since the last record
                    for i, layer in enumerate(req.chain):
                        if i >= done and not self.try_skip(layer):
                            before = self._stats.entries
                            self.extract(layer, i)
                            since += self._stats.entries - before
                        if progress is not None:
                            progress.advance(layer.desc.size)
                            progress.layer_done(i)
                        if self._want_tree(key, i, since) and i < n - 1:
                            assert key is not None
                            self._save_tree(i, key, take_snapshot(rootfs, writer.hashes),
                                            warnings)
                            since = 0
                    snap = take_snapshot(rootfs, writer.hashes)
                    if self._want_tree(key, n - 1, since):
                        assert key is not None
                        self._save_tree(n - 1, key, snap, warnings)
                    for path, st in writer.finish(snap).items():
                        snap[path] = snapshot_row(path, "d", st, "")
                    self.place = writer.place
                    storebundle.complete(stage, req, NAME, writer.root_fd, list(snap.values()),
                                         {"placement": placement,
                                          "cloned": writer.place.cloned,
                                          "copied": writer.place.copied,
                                          "linked": writer.place.linked,
                                          "adopted": writer.place.adopted})
                finally:
                    if self._writer is not None:
                        self._writer.close()
                    self._writer = None
        except BaseException:
            storebundle.abort(stage)
            raise
        return storebundle.result(req, NAME, t0, self._stats, self.reused, warnings)

    # -- tree records ---------------------------------------------------------------------
    def _tree_key(self, w: StoreRootfsWriter) -> str:
        """What a record depends on besides the chain: farm links or contents, and
        every option that changes the tree the writer makes."""
        o = w.opts
        kind = "link" if w.placement == "link" else "content"
        ident = repr((kind, o.rootless, [str(m) for m in o.uid_map],
                      [str(m) for m in o.gid_map], o.keep_dirlinks, os.geteuid(),
                      os.getegid()))
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    def _record_path(self, index: int, key: str) -> str | None:
        ex = self._store.extraction(TREES, self.req.chain[index].chain_id)
        return None if ex is None else os.path.join(ex.path, f"{key}.tree")

    def _want_tree(self, key: str | None, index: int, since: int) -> bool:
        """Whether to record the tree after layer *index*: a chain not recorded yet,
        built from store objects, that took real work above the deepest record (a
        few entries on a recorded prefix are cheaper to apply again than a record
        of the whole tree is to write)."""
        w = self._writer
        return (key is not None and w is not None and w.recordable and since >= RECORD_MIN
                and not self._has_tree(index, key))

    def _has_tree(self, index: int, key: str) -> bool:
        path = self._record_path(index, key)
        return path is not None and os.path.exists(path)

    def _load_tree(self, index: int, key: str) -> TreeRecord | None:
        path = self._record_path(index, key)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        rec = decode_record(data, self.req.chain[index].chain_id, key)
        if rec is None:     # damaged (a crash while it was written): made again
            with contextlib.suppress(OSError):
                os.unlink(path)
        return rec

    def _farms(self, upto: int) -> list[str] | None:
        """The link farms of layers 0..upto-1, or None if one is gone."""
        farms = []
        for layer in self.req.chain[:upto]:
            ex = self._store.extraction(NAME, layer.chain_id)
            if ex is None or not os.path.isdir(ex.path):
                return None
            farms.append(ex.path)
        return farms

    def _replay(self, key: str, warn: Warn) -> int:
        """Replay the record of the longest recorded prefix of the chain; returns how
        many layers it stands for (0: none, or the replay failed and the rootfs was
        emptied for the layer-by-layer way)."""
        w = self._writer
        assert w is not None
        for k in range(len(self.req.chain), 0, -1):
            rec = self._load_tree(k - 1, key)
            if rec is None:
                continue
            farms = self._farms(k) if w.placement == "link" else []
            if farms is None:
                continue
            entries = rec.entries
            dropped: list[RecordEntry] = []
            pruned = self._prune(entries, k) if k < len(self.req.chain) else None
            if pruned is not None:
                entries, dropped = pruned
            fds = [os.open(f, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for f in farms]
            try:
                w.replay(entries, fds, dropped)
            except (OSError, ValueError):
                self._restart()     # damaged record, object gone: build it layer by layer
                return 0
            finally:
                for fd in fds:
                    os.close(fd)
            self._stats = rec.stats
            for m in rec.warnings:
                warn(m)
            self.reused += k
            return k
        return 0

    def _prune(self, entries: list[RecordEntry], index: int
               ) -> tuple[list[RecordEntry], list[RecordEntry]] | None:
        """What of a replay the small layer *index* right above it would remove again
        (:func:`prune_hidden`): an opaque directory over thousands of lower entries
        costs their creation and removal otherwise."""
        split = self._store.tar_split_path(self.req.chain[index].diff_id)
        try:
            if not plain_size_within(split, PREBUILD_MAX):
                return None
            layer = split_entries(split)
        except (OSError, LaminaError):
            return None     # applying it reports the problem
        return prune_hidden(entries, layer, self.req.keep_dirlinks)

    def _restart(self) -> None:
        old = self._writer
        assert old is not None
        root, opts, placement, warn = old.root, old.opts, old.placement, old._warn
        old.close()
        shutil.rmtree(root)
        os.mkdir(root, 0o755)
        self._writer = StoreRootfsWriter(root, opts, self._store.objects_fd, placement,
                                         warn=warn)
        self.place = PlaceStats()

    def _save_tree(self, index: int, key: str, rows: Mapping[str, tuple[object, ...]],
                   warnings: list[str]) -> None:
        """Record the tree as it is after layer *index* (once per chain and key)."""
        w = self._writer
        assert w is not None
        if not w.recordable:
            return
        farms: list[str] = []
        if w.placement == "link":
            got = self._farms(index + 1)
            if got is None:
                return
            farms = got
        entries = record_tree(w, rows, farms)
        if entries is None:
            return
        stats = LayerStats(self._stats.entries, self._stats.files, self._stats.bytes,
                           self._stats.whiteouts, self._stats.skipped)
        chain = self.req.chain[index].chain_id
        data = encode_record(TreeRecord(entries, stats, list(warnings)), chain, key)
        st = self._store
        # no syncfs: a record torn by a crash fails its checksum and is made again
        with st.extraction_lock(TREES, chain):
            if self._has_tree(index, key):
                return      # another unpack recorded it meanwhile
            ex = st.extraction(TREES, chain)
            if ex is not None and not os.path.isdir(ex.path):
                st.remove_extraction(TREES, chain)
                ex = None
            d = ex.path if ex is not None else st.extraction_dir(TREES, chain)
            os.makedirs(d, 0o700, exist_ok=True)
            final = os.path.join(d, f"{key}.tree")
            tmp = f"{final}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.rename(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if ex is None:
                st.record_extraction(TREES, chain, d)

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
                if index not in self._prebuilt:
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

    def _prebuild_farms(self) -> None:
        """Build the missing link farms of small layers before the rootfs is written
        (see the module docstring): the farm inodes applying the layer would make, in
        the same order, counted in the writer's :attr:`place` as then."""
        w = self._writer
        assert w is not None
        st = self._store
        for i, layer in enumerate(self.req.chain):
            ex = st.extraction(NAME, layer.chain_id)
            if ex is not None and os.path.isdir(ex.path):
                continue
            split = st.tar_split_path(layer.diff_id)
            if not plain_size_within(split, PREBUILD_MAX):
                continue
            with st.extraction_lock(NAME, layer.chain_id):
                ex = st.extraction(NAME, layer.chain_id)
                if ex is not None and os.path.isdir(ex.path):
                    continue    # another unpack built it meanwhile
                if ex is not None:  # recorded but gone: make it again
                    st.remove_extraction(NAME, layer.chain_id)
                with st.stage_extraction(NAME, layer.chain_id) as tmp:
                    w.set_farm(tmp)
                    try:
                        with split_reader(split) as reader:
                            for e in reader:
                                if e.kind == "file" and reader.current is not None:
                                    w.farm_inode(e, reader, reader.current)
                    finally:
                        w.set_farm(None)
            self._prebuilt.add(i)

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
