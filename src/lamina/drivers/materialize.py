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

    Where the filesystem cannot share extents (ext4), a farm inode would be a
    second copy of the object's data.  There the object's own inode is
    *adopted*: hardlinked into the farm and given the entry's owner, mode and
    mtime (an object is content only: its metadata is nobody's), when nothing
    else links it (``st_nlink`` 1: no other farm, bundle or store shares it)
    and the entry has no xattrs.  The store then holds the data once for the
    objects and every read-only bundle together.

Tree records (:func:`record_tree`, :meth:`StoreRootfsWriter.replay`): once a
chain's rootfs is built, the final tree (every real path with its type,
metadata, xattrs and content source) is what any later rootfs of that chain
will be, whatever the layers' whiteouts, overwrites and symlinked parents
were.  Replaying it is per-entry syscalls in C (``_fastpath.replay_tree``): no
tar-split is read, nothing is resolved.  A record is taken from the disk after
the writer built the tree, so it holds exactly what the writer made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import marshal
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Literal

import zstandard

from lamina.errors import CorruptLayerError
from lamina.layer.extract import (
    _FD_CACHE,
    ExtractOptions,
    LayerStats,
    RootfsWriter,
    Warn,
    fastpath_enabled,
)
from lamina.layer.tarstream import FastFn, TarEntry, TarReader
from lamina.stream.splitdirfdstream import FICLONE, FILE, INLINE, Chunk, open_ref, read_chunks
from lamina.stream.stored import stored_reader

try:  # compiled replay of tree records (setup.py builds it when a compiler is there)
    from lamina import _fastpath
except ImportError:  # pragma: no cover - depends on the build
    _fastpath = None  # type: ignore[assignment]

Placement = Literal["clone", "copy", "link"]
# (kind, path, mode, uid, gid, mtime_ns, xattrs, src, size, sha256): see record_tree
RecordEntry = tuple[str, str, int, int, int, int, tuple[tuple[bytes, bytes], ...], object, int,
                    bytes | None]

_HINT = "the store is damaged: run 'lamina fsck --repair' and import the image again"
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
             errno.EPERM, errno.EBADF, errno.ETXTBSY)


@dataclass
class PlaceStats:
    cloned: int = 0             # files sharing the object's extents
    copied: int = 0             # files whose bytes were copied
    linked: int = 0             # files hardlinked to a farm inode
    farm_new: int = 0           # farm inodes made (the rest were already there)
    adopted: int = 0            # of those, store objects' own inodes (no reflinks here)

    def add(self, o: PlaceStats) -> None:
        self.cloned += o.cloned
        self.copied += o.copied
        self.linked += o.linked
        self.farm_new += o.farm_new
        self.adopted += o.adopted


_SPLIT_READ = 256 << 10      # metadata handed to the tar parser per read: many headers


class SplitFast:
    """The compiled path for a :class:`SplitTarReader` (``_fastpath.place_files``);
    the only fast path such a reader takes: file contents are not in its stream."""

    def __init__(self, fn: FastFn) -> None:
        self.fn = fn

    def __call__(self, buf: bytes, pos: int) -> tuple[int, int]:
        return self.fn(buf, pos)


class SplitTarReader(TarReader):
    """A :class:`TarReader` over a tar-split's metadata chunks.

    For each regular file with data, :attr:`current` is its file chunk (the
    data is not in the stream, :meth:`read_data` returns b"") or None when
    the split carries the data inline (then it is read as usual).  The file
    chunks met so far are :attr:`files` (None where a file's inline data
    starts); :attr:`fi` is the next one to hand out.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._chunks = read_chunks(stored_reader(f))    # a store's: maybe compressed
        self.files: list[Chunk | None] = []
        self.fi = 0
        self._in_inline = False
        self._fast: SplitFast | None = None
        self.current: Chunk | None = None
        super().__init__(self._next)

    @property
    def fast(self) -> SplitFast | None:
        return self._fast

    @fast.setter
    def fast(self, value: object) -> None:
        # extract_files would read file data from the stream: only place_files fits
        self._fast = value if isinstance(value, SplitFast) else None

    def _next(self, _n: int) -> bytes:
        # several chunks per read, so that the fast path gets many headers per call
        out: list[bytes] = []
        size = 0
        for c in self._chunks:
            if c.kind == FILE:
                self.files.append(c)
                self._in_inline = False
                continue
            if c.kind == INLINE:
                if not self._in_inline:
                    self.files.append(None)     # a new file's inline data starts
                self._in_inline = True
            else:
                self._in_inline = False
            if c.data:
                out.append(c.data)
                size += len(c.data)
                if size >= _SPLIT_READ:
                    break
        return out[0] if len(out) == 1 else b"".join(out)

    def __iter__(self) -> Iterator[TarEntry]:
        for entry in super().__iter__():
            self.current = None
            if self.fi > 4096:      # handed out: drop them (the fast path too is done)
                del self.files[:self.fi]
                self.fi = 0
            if entry.kind == "file" and entry.size > 0:
                while self.fi >= len(self.files):
                    if not self._fill():
                        raise CorruptLayerError(
                            f"tar-split: no content for {entry.name!r}", hint=_HINT)
                item = self.files[self.fi]
                self.fi += 1
                if item is not None:
                    if item.size != entry.size:
                        raise CorruptLayerError(
                            f"tar-split: {entry.name!r} is {entry.size} bytes, its object "
                            f"{item.size}", hint=_HINT)
                    self._remaining = 0         # the data is in the object, not the stream
                self.current = item
            yield entry


def reflinks(dirfd: int) -> bool:
    """Whether the filesystem of *dirfd* shares extents (FICLONE between two empty
    probe files in it)."""
    names = [f".reflink-probe-{os.getpid()}-{i}" for i in (0, 1)]
    fds: list[int] = []
    try:
        for n in names:
            fds.append(os.open(n, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                               dir_fd=dirfd))
        fcntl.ioctl(fds[1], FICLONE, fds[0])
        return True
    except OSError as e:
        if e.errno in _NO_CLONE:
            return False
        raise
    finally:
        for fd in fds:
            os.close(fd)
        for n in names[:len(fds)]:
            os.unlink(n, dir_fd=dirfd)


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
        self._split: SplitTarReader | None = None     # the layer being applied
        self._adopt: bool | None = None     # farm inodes are objects (no reflinks)
        self.xattr_paths: set[str] = set()   # where xattrs were set: read back by records
        self.recordable = True      # every file's content is a store object (or empty)

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
            if self._adopt is None:
                self._adopt = not reflinks(self._farm_fd)

    def close(self) -> None:
        self.set_farm(None)
        super().close()

    # -- the compiled path ---------------------------------------------------------------
    def apply(self, reader: TarReader, stats: LayerStats) -> None:
        self._split = reader if isinstance(reader, SplitTarReader) else None
        try:
            super().apply(reader, stats)
        finally:
            self._split = None

    def _fast_fn(self, stats: LayerStats) -> FastFn:
        r = self._split
        if r is None or not hasattr(_fastpath, "place_files"):
            return super()._fast_fn(stats)
        place = _fastpath.place_files
        rootless, euid, egid, umask = self.opts.rootless, self._euid, self._egid, self._umask
        layer = self._layer
        copy_only = self.placement == "copy"
        farm_fd = self._farm_fd if self._farm_writer is not None else -1
        key = self._farm_key
        adopt = bool(self._adopt) and farm_fd >= 0

        def fast(buf: bytes, pos: int) -> tuple[int, int]:
            (pos, entries, files, nbytes, parents, need, r.fi, cloned, copied, linked,
             made, adopted) = place(buf, pos, self._dirs, self._stale, _FD_CACHE, self.hashes,
                                    layer.paths, self.dir_meta, rootless, euid, egid, umask,
                                    r.files, r.fi, self.objects_fd, copy_only, farm_fd, key,
                                    adopt)
            if entries:
                stats.entries += entries
                stats.files += files
                stats.fast += entries
                stats.bytes += nbytes
                self.place.cloned += cloned
                self.place.copied += copied
                self.place.linked += linked
                if made:
                    self.place.farm_new += len(made)
                    self.place.adopted += adopted
                    self._farm_names.update(made)
                for p in parents:
                    layer.mark_parent(p)
            return pos, need
        return SplitFast(fast)

    def _setxattr(self, path: str, fd: int | None, name: str, value: bytes) -> None:
        self.xattr_paths.add(path)
        super()._setxattr(path, fd, name, value)

    def _hardlink(self, e: TarEntry, pfd: int, name: str, real: str, final: bool) -> bool:
        # the inode may carry xattrs set through its first path, which a later entry
        # can replace: read this path's back too
        self.xattr_paths.add(real)
        return super()._hardlink(e, pfd, name, real, final)

    def replay(self, entries: list[RecordEntry], farm_fds: list[int],
               dropped: Sequence[RecordEntry] = ()) -> None:
        """Create a recorded tree (see :func:`record_tree`) in the empty root, before
        any layer is applied; fills :attr:`hashes` and :attr:`dir_meta` as applying
        the chain's layers would have.  Raises OSError, leaving a half-made tree.

        *dropped*: entries of the record not made because the next layer hides them
        (:func:`prune_hidden`); counted and remembered as if they had been made and
        then removed by that layer."""
        assert _fastpath is not None
        cloned, copied, linked, refused = _fastpath.replay_tree(
            self.root_fd, self.objects_fd, farm_fds, entries, self.placement == "copy",
            self.opts.rootless, self._euid, self._egid, self._umask, self.hashes,
            self.dir_meta, True)     # directories final now: finish() skips those still so
        self.place.cloned += cloned
        self.place.copied += copied
        self.place.linked += linked
        filled = 0      # dropped files with a store object's content: cloned or copied
        for e in dropped:
            if e[0] == "f":
                if type(e[7]) is tuple:
                    self.place.linked += 1
                elif e[8]:
                    filled += 1
            if e[0] in ("f", "h") and e[9] is not None:
                self.hashes[e[1]] = e[9]    # (a removal leaves a path's hash, too)
        if filled:
            if self._clones(cloned, copied):
                self.place.cloned += filled
            else:
                self.place.copied += filled
        for path, bname, err in refused:
            name = bname.decode("utf-8", "surrogateescape")
            self.warn_once(f"xattr:{name.split('.')[0]}:{err}",
                           f"cannot set xattr {name} on /{path}: {os.strerror(err)} "
                           "(further such xattrs are skipped silently)")
        for es in (entries, dropped):
            self.xattr_paths.update(e[1] for e in es if e[6] or e[0] == "h")

    def _clones(self, cloned: int, copied: int) -> bool:
        """Whether replaying more files would have cloned them, after a replay that
        cloned *cloned* files and copied *copied* (it copies from the first refusal
        on; with neither, the filesystem is asked: a probe beside the root)."""
        if self.placement == "copy" or copied:
            return False
        if cloned:
            return True
        try:
            fd = os.open(os.path.dirname(os.path.abspath(self.root)),
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return reflinks(fd)
            finally:
                os.close(fd)
        except OSError:
            return False

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
        fname = self.farm_inode(e, reader, chunk)
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

    def farm_inode(self, e: TarEntry, reader: TarReader, chunk: Chunk) -> str:
        """The name of the farm inode for file entry *e* (content *chunk*), made if missing."""
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
        if self._adopt and self._adopt_object(e, chunk, tmp):
            self.place.adopted += 1
        else:
            with _quiet_unlink(self._farm_fd, tmp):
                self._farm_writer._apply_entry(replace(e, name=tmp), reader, self._farm_fd,
                                               tmp, tmp, LayerStats())
            self._farm_writer._layer.paths.discard(tmp)
        os.rename(tmp, fname, src_dir_fd=self._farm_fd, dst_dir_fd=self._farm_fd)
        self._farm_names.add(fname)
        self.place.farm_new += 1
        return fname

    def _adopt_object(self, e: TarEntry, chunk: Chunk, tmp: str) -> bool:
        """Make the object's inode the farm inode *tmp* (see the module docstring);
        False when it is not ours alone or the entry needs xattrs."""
        if e.xattrs or (self.opts.rootless and (e.uid or e.gid)) or chunk.dirfd_index:
            return False    # (rootless ownership is an xattr too)
        assert chunk.name is not None and self._farm_writer is not None
        ffd = self._farm_fd
        try:
            os.link(chunk.name, tmp, src_dir_fd=self.objects_fd, dst_dir_fd=ffd,
                    follow_symlinks=False)
        except OSError:
            return False
        with _quiet_unlink(ffd, tmp):
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=ffd)
            try:
                st = os.fstat(fd)
                # linked after the check by another farm builder: nlink 3, it backs off
                if (st.st_nlink != 2 or st.st_uid != self._euid or not stat.S_ISREG(st.st_mode)
                        or st.st_size != chunk.size):
                    os.unlink(tmp, dir_fd=ffd)
                    return False
                self._farm_writer._chown(tmp, e.uid, e.gid, fd)
                os.fchmod(fd, e.mode)   # after chown, which clears setuid bits
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)
        return True

    def _write_file(self, e: TarEntry, reader: TarReader, fd: int, real: str,
                    stats: LayerStats) -> None:
        chunk = reader.current if isinstance(reader, SplitTarReader) else None
        if chunk is None:
            if e.size:
                self.recordable = False     # content that is no object: not replayable
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


@contextlib.contextmanager
def split_reader(split_path: str) -> Iterator[SplitTarReader]:
    """A :class:`SplitTarReader` over the stored tar-split *split_path*, drained (its
    end checked) when the block ends without an exception."""
    with open(split_path, "rb", buffering=1 << 20) as f:
        reader = SplitTarReader(f)
        yield reader
        reader.drain()


def apply_split(writer: StoreRootfsWriter, split_path: str, stats: LayerStats) -> None:
    """Apply the stored layer whose tar-split is *split_path* to *writer*'s root."""
    with split_reader(split_path) as reader:
        writer.apply(reader, stats)


# -- tree records -----------------------------------------------------------------------

# format 2: the marshal dump zstd-compressed (format 1: zlib, ten times slower to
# decompress, which a near unpack waited for); a record of another format is made again
RECORD_MAGIC = b"LMTREE2\n"
RECORD_FORMAT = 2


def records_enabled() -> bool:
    """Replaying needs the compiled fast path (it is C only)."""
    return fastpath_enabled() and hasattr(_fastpath, "replay_tree")


def _xattrs_of(root_fd: int, path: str) -> tuple[tuple[bytes, bytes], ...]:
    p = f"/proc/self/fd/{root_fd}/{path}" if path else f"/proc/self/fd/{root_fd}"
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        if n.startswith("security.selinux"):
            continue    # the host's policy labels new inodes itself
        try:
            v = os.getxattr(p, n, follow_symlinks=False)
        except OSError:
            continue
        out.append((n.encode("utf-8", "surrogateescape"), v))
    return tuple(out)


def farm_inodes(farms: Sequence[str | None]) -> dict[int, tuple[int, bytes]]:
    """inode -> (farm index, raw name) of every finished inode in *farms* (d_ino
    of a listing: no stat per inode)."""
    inos: dict[int, tuple[int, bytes]] = {}
    for i, farm in enumerate(farms):
        if farm is None:
            continue
        with os.scandir(farm) as it:
            for de in it:
                if not de.name.startswith("."):
                    try:
                        inos[de.inode()] = (i, bytes.fromhex(de.name))
                    except ValueError:
                        continue    # not an inode name (farm inodes are 64 hex digits)
    return inos


def record_tree(writer: StoreRootfsWriter, rows: Mapping[str, tuple[object, ...]],
                farms: Sequence[str | None] = ()) -> list[RecordEntry] | None:
    """The tree below *writer*'s root as replay entries, from its snapshot *rows*
    (taken before :meth:`~RootfsWriter.finish`), or None when it cannot be replayed
    (content that is no store object, a socket).

    Directories get the mode and mtime finish() will give them.  A file's content
    is the store object its sha256 names (src None), or ``(i, name)``: a hardlink
    to the inode *name* (32 raw bytes of its hex name) of ``farms[i]``.  A second
    path of an inode is an ``h`` entry naming the first.  Directories come first,
    parents before children; then the rest grouped by directory (each is opened
    once), then the hardlinks.
    """
    if not writer.recordable:
        return None
    root_fd = writer.root_fd
    farm_ino = farm_inodes(farms) if farms else {}
    xpaths = writer.xattr_paths
    dir_meta = writer.dir_meta
    dirs: list[RecordEntry] = []
    groups: dict[str, list[RecordEntry]] = {}   # parent -> its non-directories
    links: list[RecordEntry] = []
    first: dict[int, str] = {}
    r: Any
    for path in sorted(rows):
        r = rows[path]
        t = r[1]
        xattrs = _xattrs_of(root_fd, path) if path in xpaths else ()
        if t == "d":
            meta = dir_meta.get(path)
            if meta is None:
                if not path:
                    continue    # the root keeps what prepare made: no layer set it
                return None
            dirs.append(("d", path, meta[0], r[3], r[4], meta[1], xattrs, None, 0, None))
            continue
        ino, extra = r[8], r[9]
        digest = extra if t == "f" and type(extra) is bytes and len(extra) == 32 else None
        if ino in first and ino not in farm_ino:
            links.append(("h", path, 0, 0, 0, 0, (), first[ino], 0, digest))
            continue
        first[ino] = path
        mode = r[2] & 0o7777
        src: object = None
        size = 0
        if t == "f":
            size = r[5]
            if ino in farm_ino:
                src = farm_ino[ino]
            elif size and digest is None:
                return None
        elif t == "l":
            src = extra
            mode = 0
        elif t in ("c", "b"):
            src = os.lstat(f"/proc/self/fd/{root_fd}/{path}").st_rdev
        elif t != "p":
            return None
        e = (t, path, mode, r[3], r[4], r[6], xattrs, src, size, digest)
        parent = path.rpartition("/")[0]
        g = groups.get(parent)
        if g is None:
            groups[parent] = [e]
        else:
            g.append(e)
    return dirs + [e for g in groups.values() for e in g] + links


def split_entries(split_path: str) -> list[TarEntry]:
    """The members of a stored layer (headers only: no object is opened)."""
    with split_reader(split_path) as reader:
        out = list(reader)
    return out


def prune_hidden(entries: list[RecordEntry], layer: Sequence[TarEntry], keep_dirlinks: bool
                 ) -> tuple[list[RecordEntry], list[RecordEntry]] | None:
    """Split a record's *entries* into those to replay and those the whiteouts of
    *layer* (the layer applied right after the replay) would remove again at once
    (an opaque directory's lower content); None when that is not certain.

    Dropping is sound where the layer's own paths resolve without a symlink of the
    record or of the layer (so lexical paths are the real ones the writer will
    mark): an entry below a whiteout is dropped unless the layer writes it or
    writes below it (the writer keeps those, with their lower metadata), and no
    replayed hardlink names a dropped path.  Applying *layer* then removes nothing
    that was replayed and leaves the same tree as replaying everything.  Dropped
    entries must not change what the replay reports: none has xattrs (a refused
    one is warned about); :meth:`StoreRootfsWriter.replay` counts a dropped file
    as linked, cloned or copied, as replaying it would have.
    """
    from lamina.errors import LaminaError
    from lamina.layer import whiteout as wh
    from lamina.layer.extract import clean_name
    if keep_dirlinks:
        return None     # a layer directory may keep a record's symlink: not lexical
    keep: set[str] = set()          # paths the layer writes, or writes below
    parents: set[str] = set()       # paths the layer resolves: record directories or new
    nondirs: set[str] = set()       # the layer's own non-directories
    opaque: list[str] = []          # directories whose lower children are hidden
    whited: list[str] = []          # paths hidden with everything below them
    try:
        for te in layer:
            if te.kind == "skip":
                continue
            if te.kind == "hardlink":
                return None     # its target may be a lower file the layer keeps
            comps = clean_name(te.name)
            marker = wh.is_marker(te.name, comps)
            if not comps:
                continue
            for i in range(1, len(comps)):
                p = "/".join(comps[:i])
                if p in nondirs:
                    return None     # resolved through the layer's symlink (or an error)
                parents.add(p)
            path = "/".join(comps)
            parent = path.rpartition("/")[0] if len(comps) > 1 else ""
            if not marker:
                keep.add(path)
                if te.kind != "dir":
                    nondirs.add(path)
            elif comps[-1] == wh.OPAQUE:
                opaque.append(parent)
            else:
                target = wh.hidden_name(comps[-1], te.name)
                if target is not None:
                    whited.append(f"{parent}/{target}" if parent else target)
    except LaminaError:
        return None             # the layer is refused when applied: nothing to gain
    if not opaque and not whited:
        return None
    keep |= parents
    exact = set(whited)
    prefixes = tuple([f"{p}/" if p else "" for p in opaque] + [f"{p}/" for p in whited])
    kept: list[RecordEntry] = []
    dropped: list[RecordEntry] = []
    for e in entries:
        path = e[1]
        if path in parents and e[0] != "d":
            return None     # resolved through the record's symlink (or an error ahead)
        if (path.startswith(prefixes) or path in exact) and path and path not in keep:
            if e[6]:
                return None
            dropped.append(e)
        else:
            kept.append(e)
    if not dropped:
        return None
    gone = {e[1] for e in dropped}
    if any(e[0] == "h" and e[7] in gone for e in kept):
        return None             # a kept path is a hardlink of a dropped one
    return kept, dropped


@dataclass
class TreeRecord:
    """A chain's final tree and what building it reported."""

    entries: list[RecordEntry]
    stats: LayerStats = field(default_factory=LayerStats)
    warnings: list[str] = field(default_factory=list)


def encode_record(rec: TreeRecord, chain_id: str, key: str) -> bytes:
    head = {"format": RECORD_FORMAT, "marshal": marshal.version, "chain": chain_id,
            "key": key, "stats": [rec.stats.entries, rec.stats.files, rec.stats.bytes,
                                  rec.stats.whiteouts, rec.stats.skipped],
            "warnings": list(rec.warnings)}
    body = zstandard.ZstdCompressor(level=1).compress(marshal.dumps((head, rec.entries)))
    return RECORD_MAGIC + hashlib.sha256(body).digest() + body


def decode_record(data: bytes, chain_id: str, key: str) -> TreeRecord | None:
    """The record in *data*, or None if it is damaged or of another chain, key or
    format (records are a cache: a bad one is made again, never trusted)."""
    n = len(RECORD_MAGIC)
    if data[:n] != RECORD_MAGIC or hashlib.sha256(data[n + 32:]).digest() != data[n:n + 32]:
        return None
    try:
        head, entries = marshal.loads(zstandard.ZstdDecompressor().decompress(data[n + 32:]))
    except (ValueError, EOFError, TypeError, zstandard.ZstdError):
        return None
    if not (isinstance(head, dict) and isinstance(entries, list)
            and head.get("format") == RECORD_FORMAT and head.get("marshal") == marshal.version
            and head.get("chain") == chain_id and head.get("key") == key):
        return None
    st: Any = head.get("stats")
    stats = LayerStats(*st) if isinstance(st, list) and len(st) == 5 else LayerStats()
    return TreeRecord(entries, stats, [str(w) for w in head.get("warnings", [])])
