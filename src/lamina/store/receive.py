"""Storing a layer that arrives as a splitdirfdstream (``lamina copy``, ``PutLayer``).

Two modes:

verified (the default, and the only one for streams from a peer)
    The stream is reassembled through the same splitter ``ingest`` uses, so
    the result is what an import of the same tar would have made: one object
    per regular file, metadata verbatim.  A file chunk that covers exactly one
    member's data is first *cloned* into this store's staging (FICLONE where
    the filesystem allows, else copied) and then read back from that private
    clone for hashing, so a peer cannot change the bytes between the check and
    the store.  If the chunk names an object this store already has, our own
    object is read instead and nothing is cloned.  Every byte is hashed: the
    tar must match the diff_id before anything is published.

trusted (``trust_source=True``, only for a local store this process opened)
    The source's tar-split was verified against the diff_id when it was
    ingested and its objects are content-addressed and never rewritten, so the
    tar-split is copied chunk by chunk and each missing object is cloned under
    the same name; no file data is read.  A damaged source store would pass
    its damage on, as ``cp`` would; ``lamina fsck`` on the source finds it.

Either way the layer's row is published last; a failure leaves only
unreferenced objects and staging, which ``gc`` reclaims (``fsck`` reports
them as garbage, not problems).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from lamina.errors import CorruptLayerError, DigestMismatchError, UsageError
from lamina.layer.tarstream import TarEntry
from lamina.oci import mediatypes as mt
from lamina.oci.model import Descriptor
from lamina.store.db import layer_objects_of
from lamina.store.ids import hex_of
from lamina.store.objects import SMALL, object_name, syncfs
from lamina.stream.splitdirfdstream import (
    FICLONE,
    FILE,
    INLINE,
    MAX_NAME,
    METADATA,
    Chunk,
    DataReader,
    StreamWriter,
    from_tar,
    import_file,
    open_ref,
    read_chunks,
    write_tar,
)
from lamina.stream.stored import open_stored, stored_reader, stored_writer

if TYPE_CHECKING:
    from lamina.store.store import Store

_IO = 1 << 20
_OBJ_NAME = re.compile(rb"^([0-9a-f]{2})/([0-9a-f]{62})$")
_SCAN = 4 << 20             # read-ahead when scanning a cloned tar-split
_CLONERS = 4                # threads cloning objects in a trusted copy
_HINT_PEER = "the sender's stream or the files it references do not match the layer"


@dataclass
class ReceiveStats:
    """What storing one layer cost."""

    files: int = 0              # regular files with content
    new_objects: int = 0
    reflinked_bytes: int = 0    # new objects made with FICLONE: no data written
    linked_bytes: int = 0       # new objects hardlinked from the source store's
    copied_bytes: int = 0       # new objects whose data was written
    present_bytes: int = 0      # objects the store already had
    tar_size: int = 0
    split_cloned: bool = False  # the tar-split itself was cloned, not rewritten
    blob: str = ""              # "reflinked", "copied", "present" or "regenerated"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SourceIndex:
    """What a local source store's index says of a layer it sends, for a trusted
    receiver that cloned the tar-split instead of scanning it: where that index is
    (attached read-only, so the layer's rows are copied in SQL), the sizes its
    ``layers`` row records, and *rows* (hex -> size) for when it cannot be attached."""

    db_path: str
    tar_size: int
    files: int
    rows: Callable[[], dict[str, int]]


@dataclass
class BlobInput:
    """The layer's compressed blob as an open file, to clone instead of regenerating."""

    fd: int
    desc: Descriptor


def object_hex(chunk: Chunk) -> str | None:
    """The object a store tar-split's file chunk names (dirfd 0, ``ab/62 hex``), else None."""
    if chunk.dirfd_index != 0 or chunk.name is None:
        return None
    m = _OBJ_NAME.match(chunk.name)
    return (m.group(1) + m.group(2)).decode() if m else None


_HDR = struct.Struct("<BI")
_FILE_HDR = struct.Struct("<BQII")


def _scan_files(f: BinaryIO, stats: ReceiveStats) -> Iterator[Chunk]:
    """The file chunks of a trusted stream, skipping over the bytes of all others
    (counted into ``stats.tar_size``); the names are checked by :func:`object_hex`."""
    buf = b""
    pos = 0

    def need(n: int) -> bool:
        nonlocal buf, pos
        if len(buf) - pos >= n:
            return True
        more = f.read(max(n - (len(buf) - pos), _SCAN))
        buf = buf[pos:] + more
        pos = 0
        if len(buf) >= n:
            return True
        if buf:
            raise CorruptLayerError("truncated splitdirfdstream in a trusted store tar-split",
                                    hint="run 'lamina fsck' on the source store")
        return False

    while need(1):
        kind = buf[pos]
        if kind == FILE:
            need(_FILE_HDR.size)
            _k, size, idx, n = _FILE_HDR.unpack_from(buf, pos)
            if n == 0 or n > MAX_NAME:
                raise CorruptLayerError(f"bad file name length {n} in a store tar-split",
                                        hint="run 'lamina fsck' on the source store")
            need(_FILE_HDR.size + n)
            name = bytes(buf[pos + _FILE_HDR.size:pos + _FILE_HDR.size + n])
            pos += _FILE_HDR.size + n
            yield Chunk(FILE, None, size, idx, name)
            continue
        if kind not in (METADATA, INLINE):
            raise CorruptLayerError(f"unknown chunk type 0x{kind:02x} in a store tar-split",
                                    hint="run 'lamina fsck' on the source store")
        need(_HDR.size)
        _k, n = _HDR.unpack_from(buf, pos)
        stats.tar_size += n
        skip = _HDR.size + n
        if len(buf) - pos >= skip:
            pos += skip
        else:
            skip -= len(buf) - pos
            buf, pos = b"", 0
            if f.seek(skip, os.SEEK_CUR) > os.fstat(f.fileno()).st_size:
                raise CorruptLayerError("truncated splitdirfdstream in a trusted store "
                                        "tar-split", hint="run 'lamina fsck' on the source store")


class _ChunkTar:
    """The tar a chunk sequence stands for, as a readable stream.

    A read never crosses a chunk boundary, so when the splitter asks where a
    member's data is, :meth:`file_at` can tell whether it is exactly one file
    chunk that nothing has read yet.
    """

    def __init__(self, chunks: Iterator[Chunk], dirfds: Sequence[int]) -> None:
        self._it = chunks
        self._dirfds = dirfds
        self._pending: Chunk | None = None
        self._data = b""
        self._dpos = 0
        self._fd = -1
        self._foff = 0
        self._fleft = 0
        self._fname = b""
        self.handed = 0             # tar bytes returned so far

    def _next(self) -> Chunk | None:
        if self._pending is not None:
            c, self._pending = self._pending, None
            return c
        return next(self._it, None)

    def file_at(self, offset: int, size: int) -> Chunk | None:
        """The file chunk that is exactly the tar bytes [offset, offset + size), if any."""
        if self.handed != offset or self._dpos < len(self._data) or self._fd >= 0:
            return None
        if self._pending is None:
            self._pending = next(self._it, None)
        c = self._pending
        return c if c is not None and c.kind == FILE and c.size == size else None

    def serve_file(self, fd: int, chunk: Chunk) -> None:
        """Serve the pending file chunk's bytes from *fd* (ours; closed when read)."""
        assert self._pending is chunk
        self._pending = None
        self._fd, self._foff, self._fleft = fd, 0, chunk.size
        self._fname = chunk.name or b""
        if not self._fleft:
            self._close_file()

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self._close_file()

    def read(self, n: int = _IO) -> bytes:
        while True:
            if self._dpos < len(self._data):
                b = self._data[self._dpos:self._dpos + n]
                self._dpos += len(b)
                self.handed += len(b)
                return b
            if self._fd >= 0:
                b = os.pread(self._fd, min(n, self._fleft, _IO), self._foff)
                if not b:
                    raise CorruptLayerError(
                        f"referenced file {self._fname.decode('utf-8', 'replace')!r} shrank "
                        "while it was read", hint="do not modify referenced files during a copy")
                self._foff += len(b)
                self._fleft -= len(b)
                if not self._fleft:
                    self._close_file()
                self.handed += len(b)
                return b
            c = self._next()
            if c is None:
                return b""
            if c.kind == FILE:
                self._pending = c
                self.serve_file(open_ref(self._dirfds, c), c)
            else:
                self._data, self._dpos = c.data or b"", 0


class _Receiver:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.sfd = store._staging.fd
        self.objw = store.objects
        self.refs: dict[str, int] = {}
        self.stats = ReceiveStats()
        self.temps: list[str] = []
        self._subdirs: dict[str, int] = {}
        self._tmpfile = True        # O_TMPFILE + FICLONE works here, until it does not
        self._objects_dev = os.fstat(self.objw.dir_fd).st_dev
        self._euid = os.geteuid()
        self._mu = threading.Lock()
        # the stream's files are a local store's objects this process opened: hash them
        # where they are (often in the page cache) instead of a private clone (new
        # inode, read from disk); only a writer to that store could change them meanwhile
        self.hash_in_place = False

    def tmpname(self, kind: str) -> str:
        name = f"{kind}-{os.getpid()}-{os.urandom(6).hex()}"
        self.temps.append(name)
        return name

    def cleanup(self) -> None:
        for fd in self._subdirs.values():
            os.close(fd)
        self._subdirs.clear()
        for name in self.temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.sfd)
        self.temps.clear()

    def _ours(self, hexd: str) -> int:
        return os.open(object_name(hexd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                       dir_fd=self.objw.dir_fd)

    def _publish_object(self, tmp: str, hexd: str) -> bool:
        try:
            os.link(tmp, object_name(hexd), src_dir_fd=self.sfd,
                    dst_dir_fd=self.objw.dir_fd, follow_symlinks=False)
            created = True
        except FileExistsError:
            created = False
        os.unlink(tmp, dir_fd=self.sfd)
        self.temps.remove(tmp)
        self.objw.known.add(hexd)
        return created

    def _clone(self, src: int) -> tuple[str, bool]:
        """A private copy of *src* in staging (FICLONE, else copied); True if cloned."""
        tmp = self.tmpname("recv")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o444, dir_fd=self.sfd)
        try:
            try:
                fcntl.ioctl(fd, FICLONE, src)
                cloned = True
            except OSError:
                cloned = False      # not reflink-capable, another filesystem, ...
            if not cloned:
                os.close(fd)
                fd = -1
                os.unlink(tmp, dir_fd=self.sfd)
                import_file(src, self.sfd, tmp, mode=0o444)
            elif self.objw._fchmod:
                os.fchmod(fd, 0o444)
        finally:
            if fd >= 0:
                os.close(fd)
        return tmp, cloned

    # -- verified ------------------------------------------------------------------------
    def verified(self, stream: BinaryIO, dirfds: Sequence[int], out: StreamWriter) -> str:
        tar = _ChunkTar(read_chunks(stream), dirfds)

        def place(entry: TarEntry, data: DataReader) -> tuple[int, str]:
            size = entry.size
            self.stats.files += 1
            chunk = tar.file_at(entry.offset + len(entry.raw_header), size)
            if chunk is None:
                return self._place_bytes(size, data)
            claimed = object_hex(chunk)
            tmp: str | None = None
            cloned = False
            keep = -1               # hashed in place: cloned once it was read
            try:
                if claimed is not None and self.objw.exists(claimed):
                    fd = self._ours(claimed)
                elif self.hash_in_place:
                    keep = open_ref(dirfds, chunk)
                    fd = os.dup(keep)
                else:
                    src = open_ref(dirfds, chunk)
                    try:
                        tmp, cloned = self._clone(src)
                    finally:
                        os.close(src)
                    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.sfd)
                tar.serve_file(fd, chunk)
                h = hashlib.sha256()
                while b := data():
                    h.update(b)
                if keep >= 0:
                    tmp, cloned = self._clone(keep)
            finally:
                if keep >= 0:
                    os.close(keep)
            hexd = h.hexdigest()
            if tmp is None:
                if hexd != claimed:
                    raise CorruptLayerError(
                        f"object sha256:{claimed} of the store {self.store.path} holds "
                        f"sha256:{hexd}", hint="run 'lamina fsck --repair'")
                self.stats.present_bytes += size
            elif self._publish_object(tmp, hexd):
                self.stats.new_objects += 1
                if cloned:
                    self.stats.reflinked_bytes += size
                else:
                    self.stats.copied_bytes += size
            else:
                self.stats.present_bytes += size
            self.refs[hexd] = size
            return 0, object_name(hexd)

        try:
            return from_tar(cast(BinaryIO, tar), out, place)
        finally:
            tar.close()

    def _place_bytes(self, size: int, data: DataReader) -> tuple[int, str]:
        """Content that is not one whole file chunk: store it like ``ingest`` does."""
        if size <= SMALL:
            parts: list[bytes] = []
            while b := data():
                parts.append(b)
            hexd, created = self.objw.put_bytes(b"".join(parts))
        else:
            hexd, _n, created = self.objw.put_stream(data)
        if created:
            self.stats.new_objects += 1
            self.stats.copied_bytes += size
        else:
            self.stats.present_bytes += size
        self.refs[hexd] = size
        return 0, object_name(hexd)

    # -- trusted -------------------------------------------------------------------------
    def clone_split(self, stream: BinaryIO) -> str | None:
        """A trusted stream that is a store's tar-split file itself: FICLONE it whole
        (its bytes are what we would write).  None if it is a pipe or cannot be cloned."""
        try:
            fd = stream.fileno()
            if not stat.S_ISREG(os.fstat(fd).st_mode) or os.lseek(fd, 0, os.SEEK_CUR) != 0:
                return None
        except (OSError, ValueError, io.UnsupportedOperation):
            return None
        tmp = self.tmpname("split")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444,
                      dir_fd=self.sfd)
        try:
            fcntl.ioctl(dst, FICLONE, fd)
        except OSError:
            os.unlink(tmp, dir_fd=self.sfd)
            self.temps.remove(tmp)
            return None
        finally:
            os.close(dst)
        return tmp

    def trusted(self, stream: BinaryIO, dirfds: Sequence[int],
                out: StreamWriter | None) -> None:
        """Clone the objects a store's tar-split names; re-encode it into *out* (None:
        it was cloned already).

        Objects are looked up in the index in batches (a row is committed only after
        its file, and gc cannot run while we hold the store), and the missing ones
        are cloned on a few threads: cloning is system calls, which run in parallel.
        """
        want: dict[str, Chunk] = {}
        stream = stored_reader(stream)     # a store's tar-split file: maybe compressed
        for c in (read_chunks(stream) if out is not None else _scan_files(stream, self.stats)):
            self.stats.tar_size += c.size
            if c.kind != FILE:
                assert c.data is not None
                if out is not None:
                    (out.metadata if c.kind == METADATA else out.inline)(c.data)
                continue
            hexd = object_hex(c)
            if hexd is None:
                raise UsageError(f"file chunk {c.name!r} does not name a store object",
                                 hint="trust_source is only for streams of a lamina store")
            self.stats.files += 1
            self.refs[hexd] = c.size
            want.setdefault(hexd, c)
            if out is not None:
                out.file_ref(c.size, 0, object_name(hexd))
        if out is not None:
            out.flush()
        self.bring({h: c.size for h, c in want.items()}, dirfds)

    def bring(self, want: dict[str, int], dirfds: Sequence[int]) -> None:
        """Clone or link the objects *want* names (hex -> size) that this store lacks
        from ``dirfds[0]``, a trusted store's objects directory."""
        if not dirfds and want:
            raise UsageError("a store's stream needs its objects directory as dirfd 0")
        present = self._indexed(list(want))
        missing = [(h, n) for h, n in want.items() if h not in present]
        self.stats.present_bytes += sum(want[h] for h in present)
        self._bring_missing(missing, dirfds)

    def bring_attached(self, source: str, diff_id: str, dirfds: Sequence[int]) -> None:
        """:meth:`bring` for layer *diff_id* of a source index attached as *source*:
        what we lack is one query instead of a lookup per object."""
        if not dirfds:
            raise UsageError("a store's stream needs its objects directory as dirfd 0")
        db = self.store.db
        of_layer = layer_objects_of(source)
        missing = [(str(h), int(cast(int, n))) for h, n in db.query(
            f"SELECT substr(o.digest, 8), o.size {of_layer} "
            f"AND l.object NOT IN (SELECT digest FROM main.objects)", (diff_id,))]
        total = int(cast(int, db.query(f"SELECT total(o.size) {of_layer}", (diff_id,))[0][0]))
        self.stats.present_bytes += total - sum(n for _h, n in missing)
        self._bring_missing(missing, dirfds)

    def _bring_missing(self, missing: list[tuple[str, int]], dirfds: Sequence[int]) -> None:
        link_all = self._linkable_dir(dirfds[0]) if missing else False
        if link_all:
            missing = self._link_compiled(dirfds[0], missing)

        def work(part: list[tuple[str, int]]) -> list[tuple[bool, str]]:
            if link_all:
                return self._link_objects(dirfds[0], part)
            return [self._clone_object(dirfds[0], h, n) for h, n in part]

        # one slice per thread: a future per object would cost more than the clone
        n = max(1, min(_CLONERS, len(missing) // 256))
        parts = [missing[i::n] for i in range(n)]
        with ThreadPoolExecutor(max_workers=n) as pool:
            done = list(pool.map(work, parts))
        results = [(hc, r) for part, rs in zip(parts, done, strict=True)
                   for hc, r in zip(part, rs, strict=True)]
        for (_h, size), (created, how) in results:
            if not created:
                self.stats.present_bytes += size
            else:
                self.stats.new_objects += 1
                if how == "linked":
                    self.stats.linked_bytes += size
                elif how == "cloned":
                    self.stats.reflinked_bytes += size
                else:
                    self.stats.copied_bytes += size

    def _linkable_dir(self, src_dir: int) -> bool:
        """Whether every object below *src_dir* may be hardlinked unchecked: the
        directory is ours, on our filesystem and writable by nobody else, so
        only we (or root) can have put files in it."""
        st = os.fstat(src_dir)
        return (st.st_dev == self._objects_dev and st.st_uid == self._euid
                and not st.st_mode & 0o022)

    def _link_compiled(self, src_dir: int, missing: list[tuple[str, int]]
                       ) -> list[tuple[str, int]]:
        """:meth:`_link_objects` in C for all of *missing* at once (two threads, no
        GIL); returns the objects it could not link, for the checked path (all of
        them without the compiled extension)."""
        from lamina.layer.extract import fastpath_enabled
        if not missing or not fastpath_enabled():
            return missing
        from lamina import _fastpath
        if not hasattr(_fastpath, "link_objects"):
            return missing
        fds = [self._subdir(f"{i:02x}") for i in range(256)]
        status = _fastpath.link_objects(src_dir, fds, [h for h, _n in missing])
        rest: list[tuple[str, int]] = []
        for (h, n), err in zip(missing, status, strict=True):
            if err == 0:
                self.objw.known.add(h)
                self.stats.new_objects += 1
                self.stats.linked_bytes += n
            elif err == errno.EEXIST:
                self.stats.present_bytes += n
            else:
                rest.append((h, n))
        return rest

    def _link_objects(self, src_dir: int, part: list[tuple[str, int]]
                      ) -> list[tuple[bool, str]]:
        """:meth:`_clone_object` for a :meth:`_linkable_dir`: a bare linkat per
        object (the copy of a big image is tens of thousands of them); whatever
        cannot be linked takes the checked path."""
        out: list[tuple[bool, str]] = []
        link, subdir, known = os.link, self._subdir, self.objw.known
        for h, n in part:
            try:
                link(f"{h[:2]}/{h[2:]}", h[2:], src_dir_fd=src_dir, dst_dir_fd=subdir(h[:2]),
                     follow_symlinks=False)
            except FileExistsError:
                out.append((False, "linked"))
            except OSError:     # EMLINK, protected_hardlinks on a root-made file, ...
                out.append(self._clone_object(src_dir, h, n))
            else:
                known.add(h)
                out.append((True, "linked"))
        return out

    def _indexed(self, hexds: list[str]) -> set[str]:
        """The objects among *hexds* this store's index records."""
        out: set[str] = set()
        for i in range(0, len(hexds), 500):
            part = [f"sha256:{h}" for h in hexds[i:i + 500]]
            rows = self.store.db.query(
                f"SELECT digest FROM objects WHERE digest IN ({','.join('?' * len(part))})",
                tuple(part))
            out.update(str(r[0])[7:] for r in rows)
        return out

    def _subdir(self, prefix: str) -> int:
        fd = self._subdirs.get(prefix)
        if fd is None:
            fd = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self.objw.dir_fd)
            old = self._subdirs.setdefault(prefix, fd)
            if old != fd:       # another thread was first
                os.close(fd)
                fd = old
        return fd

    @staticmethod
    def _check_source(st: os.stat_result, hexd: str, size: int) -> None:
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise CorruptLayerError(
                f"object sha256:{hexd} of the source store is not a {size}-byte file",
                hint="run 'lamina fsck' on the source store")

    def _clone_object(self, src_dir: int, hexd: str, size: int) -> tuple[bool, str]:
        """Bring one trusted object (its name is ``ab/62 hex``, checked) into this
        store; returns ``(created, how)``, *how* being "linked", "cloned" or "copied".

        On the same filesystem, an object the caller owns is hardlinked: objects are
        immutable (0444, replaced only by unlink), so two stores can share the inode,
        which costs a directory entry, not an inode and its extents.  Someone else's
        is never linked (its owner could change it under this store).  Otherwise an
        unnamed O_TMPFILE in ``objects/ab/`` gets the data (FICLONE) and is then
        linked under its name, so it appears whole and never replaces a file; without
        O_TMPFILE or FICLONE, the staging path is taken."""
        name = object_name(hexd)
        # the link path needs no open: one fstatat, one linkat (half the syscalls)
        st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
        self._check_source(st, hexd, size)
        if st.st_dev == self._objects_dev and st.st_uid == self._euid:
            try:
                os.link(name, hexd[2:], src_dir_fd=src_dir,
                        dst_dir_fd=self._subdir(hexd[:2]), follow_symlinks=False)
            except FileExistsError:
                return False, "linked"
            except OSError:
                pass        # e.g. EMLINK, or protected_hardlinks: clone instead
            else:
                self.objw.known.add(hexd)
                return True, "linked"
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                      dir_fd=src_dir)
        try:
            self._check_source(os.fstat(src), hexd, size)  # the file opened
            if self._tmpfile:
                d = self._subdir(hexd[:2])
                try:
                    fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o444,
                                 dir_fd=d)
                except OSError:
                    self._tmpfile = False
                else:
                    try:
                        fcntl.ioctl(fd, FICLONE, src)
                        if self.objw._fchmod:
                            os.fchmod(fd, 0o444)
                        try:
                            os.link(f"/proc/self/fd/{fd}", hexd[2:], dst_dir_fd=d)
                        except FileExistsError:
                            return False, "cloned"
                        self.objw.known.add(hexd)
                        return True, "cloned"
                    except OSError:
                        self._tmpfile = False   # no FICLONE here (or no /proc): staging
                    finally:
                        os.close(fd)
            with self._mu:
                tmp = self.tmpname("recv")
            cloned = import_file(src, self.sfd, tmp, mode=0o444)
            with self._mu:
                return self._publish_object(tmp, hexd), "cloned" if cloned else "copied"
        finally:
            os.close(src)

    # -- blobs ---------------------------------------------------------------------------
    def stage_blob(self, blob: BlobInput, verify: bool) -> str:
        st = os.fstat(blob.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != blob.desc.size:
            raise DigestMismatchError(
                f"blob {blob.desc.digest}: not a regular file of {blob.desc.size} bytes",
                hint=_HINT_PEER)
        tmp, cloned = self._clone(blob.fd)
        if verify:
            h = hashlib.sha256()
            with open(os.open(tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.sfd), "rb",
                      buffering=0) as f:
                while b := f.read(_IO):
                    h.update(b)
            if "sha256:" + h.hexdigest() != blob.desc.digest:
                raise DigestMismatchError(f"blob {blob.desc.digest} does not match its digest",
                                          hint=_HINT_PEER)
        self.stats.blob = "reflinked" if cloned else "copied"
        return tmp

    def regenerate_blob(self, split: str, compression: str) -> tuple[str, Descriptor]:
        """Compress the layer rebuilt from its new tar-split and our objects."""
        from lamina.layer.generate import _compressor, _Sink

        media_type = mt.COMPRESSION_LAYER_TYPE.get(compression)
        if media_type is None:
            raise UsageError(f"unknown compression {compression!r}", hint="gzip, zstd or none")
        tmp = self.tmpname("blob")
        h = hashlib.sha256()
        n = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444,
                     dir_fd=self.sfd)
        with open(fd, "wb", buffering=_IO) as f:
            def write(b: bytes) -> None:
                nonlocal n
                h.update(b)
                n += len(b)
                f.write(b)

            comp = _compressor(compression, _Sink(write))
            with open_stored(split, self.sfd) as s:
                write_tar(read_chunks(s), [self.objw.dir_fd], comp)
            if compression != "none":
                comp.close()
        self.stats.blob = "regenerated"
        return tmp, Descriptor(media_type, "sha256:" + h.hexdigest(), n)


def receive(store: Store, stream: BinaryIO, dirfds: Sequence[int], *, diff_id: str | None,
            blob: BlobInput | None, compression: str, trust_source: bool,
            local_source: bool = False,
            source_index: SourceIndex | None = None) -> tuple[Descriptor, str, ReceiveStats]:
    """Store one layer from a splitdirfdstream; the caller holds a session.

    Returns the blob descriptor, the diff_id and what it cost.  With
    *trust_source*, *source_index* (the local source store's rows for the layer)
    replaces the scan of a cloned tar-split.
    """
    if trust_source and (diff_id is None or blob is None):
        raise UsageError("a trusted copy needs the diff_id and the blob")
    if diff_id is not None:
        hex_of(diff_id)
    r = _Receiver(store)
    r.hash_in_place = local_source
    stack = contextlib.ExitStack()     # the attached source index, if any
    attached: str | None = None
    try:
        cloned = r.clone_split(stream) if trust_source else None
        if cloned is not None:
            split = cloned
            r.stats.split_cloned = True
            if source_index is not None:
                assert diff_id is not None
                r.stats.tar_size = source_index.tar_size
                r.stats.files = source_index.files
                attached = stack.enter_context(store.db.attached(source_index.db_path))
                if attached is not None:
                    r.bring_attached(attached, diff_id, dirfds)
                else:
                    r.refs = source_index.rows()
                    r.bring(r.refs, dirfds)
            else:
                with open_stored(split, r.sfd) as f:
                    r.trusted(f, dirfds, None)
            assert diff_id is not None
            digest = diff_id
        else:
            split = r.tmpname("split")
            fd = os.open(split, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444,
                         dir_fd=r.sfd)
            with open(fd, "wb", buffering=_IO) as f, stored_writer(f) as w:
                if trust_source:
                    r.trusted(stream, dirfds, w)
                    assert diff_id is not None
                    digest = diff_id
                else:
                    digest = r.verified(stream, dirfds, w)
                r.stats.tar_size = w.tar_size
        if diff_id is not None and digest != diff_id:
            raise DigestMismatchError(
                f"layer stream reassembles to {digest}, expected diff_id {diff_id}",
                hint=_HINT_PEER)
        if blob is not None:
            staged_blob = r.stage_blob(blob, verify=not trust_source)
            desc = blob.desc
        else:
            staged_blob, desc = r.regenerate_blob(split, compression)
        with store.layer_lock(digest):
            if store._layer_ready(digest) and store.has_blob(desc.digest):
                r.stats.blob = "present"
                return desc, digest, r.stats
            os.rename(split, store.tar_split_path(digest), src_dir_fd=r.sfd)
            r.temps.remove(split)
            store._link_blob(staged_blob, desc.digest)
            r.temps.remove(staged_blob)
            if store.options.fsync:
                syncfs(store._root_fd)
            store._record_layer(digest, r.refs, desc, r.stats.tar_size, r.stats.files,
                                source=attached)
        return desc, digest, r.stats
    finally:
        r.cleanup()
        stack.close()
