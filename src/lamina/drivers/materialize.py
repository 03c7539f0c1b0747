"""Apply a stored layer to a directory from its tar-split and the store's objects.

A stored layer is its tar's headers (the tar-split's metadata chunks) plus
references to content objects (its file chunks).  :class:`SplitTarReader`
feeds :class:`~lamina.layer.extract.RootfsWriter` the headers alone, so every
OCI rule (whiteouts, opaque directories, hardlinks, symlinks resolved inside
the rootfs, delayed directory modes) is the very code ``lamina unpack`` runs;
:class:`StoreRootfsWriter` only changes where a regular file's bytes come
from.  Nothing is decompressed or hashed: the object's name is its sha256.

How a file gets its content (:data:`Placement`):

``clone``
    ``FICLONE`` of the object (btrfs, xfs with reflink=1, bcachefs): a new
    inode sharing the object's extents, copy-on-write, so the rootfs can be
    written freely.  Where the kernel refuses (another filesystem, ext4), the
    bytes are copied with ``copy_file_range``.
``copy``
    always copied: a writable rootfs on a filesystem without reflinks.
``link``
    a hardlink to an inode in a *link farm* (an extraction directory of the
    layer's chain) holding the object's content with the entry's mode, owner,
    mtime and xattrs (an inode has one set of metadata, so the store's 0444
    object itself cannot be linked).  Every bundle using the layer shares the
    farm's inodes: no data and no inode per file.  Only for read-only
    bundles: writing a linked file in place would change every bundle using
    the layer (the farm is never modified after it is built).  Identical files
    (same content and metadata) of one layer become one inode, so ``link``
    rootfs have more hardlinks than the image's tar says.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO, Literal

from lamina.errors import CorruptLayerError
from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter, Warn
from lamina.layer.tarstream import TarEntry, TarReader
from lamina.stream.splitdirfdstream import FICLONE, FILE, INLINE, Chunk, open_ref, read_chunks

Placement = Literal["clone", "copy", "link"]

_HINT = "the store is damaged: run 'lamina fsck --repair' and import the image again"
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
             errno.EPERM, errno.EBADF, errno.ETXTBSY)


@dataclass
class PlaceStats:
    cloned: int = 0             # files sharing the object's extents
    copied: int = 0             # files whose bytes were copied
    linked: int = 0             # files hardlinked to a farm inode
    farm_new: int = 0           # farm inodes made (the rest were already there)

    def add(self, o: PlaceStats) -> None:
        self.cloned += o.cloned
        self.copied += o.copied
        self.linked += o.linked
        self.farm_new += o.farm_new


class SplitTarReader(TarReader):
    """A :class:`TarReader` over a tar-split's metadata chunks.

    For each regular file with data, :attr:`current` is its file chunk (the
    data is not in the stream, :meth:`read_data` returns b"") or None when
    the split carries the data inline (then it is read as usual).
    """

    def __init__(self, f: BinaryIO) -> None:
        self._chunks = read_chunks(f)
        self._data: deque[Chunk | None] = deque()
        self._in_inline = False
        self.current: Chunk | None = None
        super().__init__(self._next)

    @property
    def fast(self) -> None:
        """The compiled fast path reads file data from the stream: never here."""
        return None

    @fast.setter
    def fast(self, _value: object) -> None:
        pass

    def _next(self, _n: int) -> bytes:
        for c in self._chunks:
            if c.kind == FILE:
                self._data.append(c)
                self._in_inline = False
                continue
            if c.kind == INLINE:
                if not self._in_inline:
                    self._data.append(None)     # a new file's inline data starts
                self._in_inline = True
            else:
                self._in_inline = False
            if c.data:
                return c.data
        return b""

    def __iter__(self) -> Iterator[TarEntry]:
        for entry in super().__iter__():
            self.current = None
            if entry.kind == "file" and entry.size > 0:
                while not self._data:
                    if not self._fill():
                        raise CorruptLayerError(
                            f"tar-split: no content for {entry.name!r}", hint=_HINT)
                item = self._data.popleft()
                if item is not None:
                    if item.size != entry.size:
                        raise CorruptLayerError(
                            f"tar-split: {entry.name!r} is {entry.size} bytes, its object "
                            f"{item.size}", hint=_HINT)
                    self._remaining = 0         # the data is in the object, not the stream
                self.current = item
            yield entry


def object_digest(chunk: Chunk) -> bytes | None:
    """The sha256 a store object's name (``ab/cdef...``) stands for; None for a
    name that is not a digest (a split made elsewhere)."""
    assert chunk.name is not None
    h = chunk.name.replace(b"/", b"")
    if len(h) != 64:
        return None
    try:
        return bytes.fromhex(h.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def clone_or_copy(src: int, dst: int, size: int, copy_only: bool = False) -> bool:
    """Fill *dst* with *src*'s content; True when the extents are shared (FICLONE)."""
    if not copy_only:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return True
        except OSError as e:
            if e.errno not in _NO_CLONE:
                raise
    off = 0
    while off < size:
        try:
            n = os.copy_file_range(src, dst, size - off, off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = _rw_copy(src, dst, off, size)
        if n == 0:
            raise CorruptLayerError("a store object shrank while it was copied", hint=_HINT)
        off += n
    return False


def _rw_copy(src: int, dst: int, off: int, size: int) -> int:
    start = off
    while off < size:
        b = os.pread(src, min(1 << 20, size - off), off)
        if not b:
            break
        os.pwrite(dst, b, off)
        off += len(b)
    return off - start


class StoreRootfsWriter(RootfsWriter):
    """A :class:`RootfsWriter` whose file contents come from store objects.

    *objects_fd*: the store's ``objects/`` directory.  For ``link`` placement
    the caller names the layer's link farm with :meth:`set_farm` before
    applying it (without one, files are cloned or copied).  With
    *keep_lower_dirs* the modes and mtimes of directories that were already
    there (a snapshot of the layers below) are restored at :meth:`finish`
    after this layer's changes inside them, as one writer applying every layer
    would have left them.
    """

    def __init__(self, root: str, opts: ExtractOptions, objects_fd: int,
                 placement: Placement = "clone", *, warn: Warn | None = None,
                 keep_lower_dirs: bool = False) -> None:
        super().__init__(root, opts, warn)
        self.objects_fd = objects_fd
        self.placement: Placement = placement
        self.keep_lower_dirs = keep_lower_dirs
        self.place = PlaceStats()
        self._farm_fd = -1
        self._farm_key = repr((opts.rootless, opts.uid_map, opts.gid_map)).encode()
        self._farm_writer: StoreRootfsWriter | None = None
        self._farm_names: set[str] = set()

    def set_farm(self, farm: str | None) -> None:
        """The link farm the next layer's files are linked from (``link`` placement)."""
        if self._farm_writer is not None:
            self._farm_writer.close()
            self._farm_writer = None
            self._farm_fd = -1
        if farm is not None:
            self._farm_writer = StoreRootfsWriter(farm, self.opts, self.objects_fd,
                                                  self.placement, warn=self._warn)
            self._farm_fd = self._farm_writer.root_fd
            # one listing instead of a stat per file (inodes are only ever added)
            self._farm_names = set(os.listdir(self._farm_fd))

    def close(self) -> None:
        self.set_farm(None)
        super().close()

    # -- directories of lower layers ------------------------------------------------------
    def _resolve(self, comps: tuple[str, ...], create: bool,
                 entry: str) -> tuple[str, ...] | None:
        # called on a directory-cache miss, before anything is written below comps
        if not self.keep_lower_dirs:
            return super()._resolve(comps, create, entry)
        self._note_lower(comps)
        real = super()._resolve(comps, create, entry)
        if real is not None and real != comps:
            self._note_lower(real)  # through a symlink (lib -> usr/lib): the real dirs
        return real

    def _note_lower(self, comps: tuple[str, ...]) -> None:
        # record (mode, mtime) of existing directories before this layer writes into them
        parts: list[str] = []
        for c in ("", *comps):
            if c:
                parts.append(c)
            path = "/".join(parts)
            if path in self.dir_meta:
                continue
            try:
                st = os.stat(path or ".", dir_fd=self.root_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return
            if not stat.S_ISDIR(st.st_mode):
                return  # a symlink: resolution goes elsewhere, noted when it gets there
            self.dir_meta[path] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns)

    # -- regular files ---------------------------------------------------------------------
    def _apply_entry(self, e: TarEntry, reader: TarReader, pfd: int, name: str, real: str,
                     stats: LayerStats) -> None:
        chunk = reader.current if isinstance(reader, SplitTarReader) else None
        if e.kind != "file" or chunk is None or self._farm_writer is None:
            super()._apply_entry(e, reader, pfd, name, real, stats)
            return
        fname = self._farm_inode(e, reader, chunk)
        try:
            os.link(fname, name, src_dir_fd=self._farm_fd, dst_dir_fd=pfd,
                    follow_symlinks=False)
        except FileExistsError:     # most entries land on a free path: look only now
            self._replace(pfd, name, real)
            os.link(fname, name, src_dir_fd=self._farm_fd, dst_dir_fd=pfd,
                    follow_symlinks=False)
        self._set_hash(real, chunk)
        self.place.linked += 1
        stats.files += 1
        stats.bytes += e.size

    def _farm_inode(self, e: TarEntry, reader: TarReader, chunk: Chunk) -> str:
        h = hashlib.sha256(self._farm_key)
        assert chunk.name is not None
        h.update(chunk.name + f"|{e.mode}|{e.uid}|{e.gid}|{e.mtime_ns}".encode())
        for k in sorted(e.xattrs):
            h.update(b"\0" + k.encode("utf-8", "surrogateescape") + b"=" + e.xattrs[k])
        fname = h.hexdigest()
        if fname in self._farm_names:
            return fname
        # made under a temporary name, renamed when complete: a farm never holds a
        # half-made inode that a later bundle would link
        assert self._farm_writer is not None
        tmp = f".{fname}.{os.getpid()}"
        with _quiet_unlink(self._farm_fd, tmp):
            self._farm_writer._apply_entry(replace(e, name=tmp), reader, self._farm_fd, tmp,
                                           tmp, LayerStats())
        self._farm_writer._layer.paths.discard(tmp)
        os.rename(tmp, fname, src_dir_fd=self._farm_fd, dst_dir_fd=self._farm_fd)
        self._farm_names.add(fname)
        self.place.farm_new += 1
        return fname

    def _write_file(self, e: TarEntry, reader: TarReader, fd: int, real: str,
                    stats: LayerStats) -> None:
        chunk = reader.current if isinstance(reader, SplitTarReader) else None
        if chunk is None:
            super()._write_file(e, reader, fd, real, stats)
            return
        try:
            src = open_ref([self.objects_fd], chunk)
            try:
                if clone_or_copy(src, fd, chunk.size, self.placement == "copy"):
                    self.place.cloned += 1
                else:
                    self.place.copied += 1
            finally:
                os.close(src)
        except BaseException:
            os.close(fd)
            raise
        # the stream holds no data for it: the base class applies owner, xattrs, mode
        # and mtime exactly as for an extracted file (and closes fd)
        super()._write_file(e, reader, fd, real, stats)
        self._set_hash(real, chunk)

    def _set_hash(self, real: str, chunk: Chunk) -> None:
        # the content was not read here: its hash is the object's name, or unknown
        # (then repack hashes the file)
        d = object_digest(chunk)
        if d is None:
            self.hashes.pop(real, None)
        else:
            self.hashes[real] = d


class _quiet_unlink:
    """Remove *name* if the block fails (a half-made farm inode)."""

    def __init__(self, dirfd: int, name: str) -> None:
        self.dirfd, self.name = dirfd, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: object, *_: object) -> None:
        if typ is not None:
            try:
                os.unlink(self.name, dir_fd=self.dirfd)
            except OSError:
                pass


def apply_split(writer: StoreRootfsWriter, split_path: str, stats: LayerStats) -> None:
    """Apply the stored layer whose tar-split is *split_path* to *writer*'s root."""
    with open(split_path, "rb", buffering=1 << 20) as f:
        reader = SplitTarReader(f)
        writer.apply(reader, stats)
        reader.drain()
