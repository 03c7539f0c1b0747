"""splitdirfdstream: a layer's tar as metadata plus references to files on disk.

A stream is a plain sequence of chunks (no header, no trailer); each chunk is a
type byte followed by little-endian fields:

=====  ==========  ===================================================
type   name        fields
=====  ==========  ===================================================
0x00   metadata    u32 length, bytes (tar headers and padding, verbatim)
0x01   inline      u32 length, bytes (file content carried in the stream)
0x02   file        u64 size, u32 dirfd index, u32 name length, name
=====  ==========  ===================================================

A file chunk stands for the whole content of the regular file ``name``
resolved beneath ``dirfds[index]`` without following any symlink.  The tar is
the concatenation of every chunk's bytes in order.  See docs/splitdirfdstream.md.

Everything read is untrusted: lengths are bounded, names are checked before
any system call and resolved with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)
(or a component-wise O_NOFOLLOW walk on kernels without openat2), and the
opened file must be regular and exactly the announced size.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from lamina.errors import (
    CorruptLayerError,
    EnvironmentError_,
    NotFoundError,
    UnsafeLayerError,
)
from lamina.layer.tarstream import TarEntry, TarReader

METADATA, INLINE, FILE = 0, 1, 2
KIND_NAMES = {METADATA: "metadata", INLINE: "inline", FILE: "file"}

MAX_CHUNK = 16 << 20        # metadata/inline payload bound: a reader never allocates more
MAX_NAME = 4096             # PATH_MAX
MAX_DIRFDS = 1 << 16        # sanity bound on the dirfd index
MAX_FILE = 1 << 62          # a file chunk's size must fit in an off_t

_U32 = struct.Struct("<I")
_FILE_HDR = struct.Struct("<QII")   # size, dirfd index, name length
_COALESCE = 64 << 10        # small consecutive metadata chunks are merged up to this size
_IO = 1 << 20

FICLONE = 0x40049409        # _IOW(0x94, 9, int)

_HINT_CORRUPT = "the stream is damaged, truncated or was not produced as splitdirfdstream"
_HINT_UNSAFE = "the stream names a file outside its directory; it is hostile or corrupt"


@dataclass(slots=True)
class Chunk:
    kind: int                       # METADATA, INLINE or FILE
    data: bytes | None              # payload of METADATA/INLINE, None for FILE
    size: int                       # payload length, or the referenced file's size
    dirfd_index: int = 0            # FILE only
    name: bytes | None = None       # FILE only: relative path beneath dirfds[dirfd_index]


# -- names -----------------------------------------------------------------------------------

def check_name(name: str | bytes) -> bytes:
    """Validate a file chunk's name and return it as bytes.

    Accepted names are relative, normalised paths: non-empty components, none
    of them ``.`` or ``..``, no NUL, at most :data:`MAX_NAME` bytes.
    """
    b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
    if not b:
        raise CorruptLayerError("splitdirfdstream file chunk has an empty name",
                                hint=_HINT_CORRUPT)
    if len(b) > MAX_NAME:
        raise CorruptLayerError(
            f"splitdirfdstream file name of {len(b)} bytes exceeds the {MAX_NAME}-byte limit",
            hint=_HINT_CORRUPT)
    if b"\0" in b:
        raise UnsafeLayerError(f"splitdirfdstream file name contains a NUL byte: {b!r}",
                               hint=_HINT_UNSAFE)
    if b.startswith(b"/"):
        raise UnsafeLayerError(f"splitdirfdstream file name is absolute: {b!r}",
                               hint=_HINT_UNSAFE)
    for comp in b.split(b"/"):
        if comp == b"..":
            raise UnsafeLayerError(f"splitdirfdstream file name contains '..': {b!r}",
                                   hint=_HINT_UNSAFE)
        if comp in (b"", b"."):
            raise UnsafeLayerError(
                f"splitdirfdstream file name is not a normalised relative path: {b!r}",
                hint=_HINT_UNSAFE)
    return b


# -- writer ----------------------------------------------------------------------------------

class StreamWriter:
    """Encode chunks onto *f*.

    Consecutive metadata chunks are buffered and merged (tar headers are 512
    bytes each; one chunk per header would double the chunk overhead), so call
    :meth:`flush` (or :meth:`close`, or use ``with``) at the end.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._meta = bytearray()
        self.chunks = 0
        self.bytes_written = 0      # encoded stream bytes
        self.tar_size = 0           # bytes the stream expands to

    def _put(self, data: bytes | bytearray) -> None:
        self._f.write(data)
        self.bytes_written += len(data)

    def _flush_meta(self) -> None:
        if self._meta:
            self._put(bytes((METADATA,)) + _U32.pack(len(self._meta)) + self._meta)
            self.chunks += 1
            self._meta = bytearray()

    def metadata(self, data: bytes) -> None:
        self.tar_size += len(data)
        limit = min(_COALESCE, MAX_CHUNK)
        mv = memoryview(data)
        while len(mv):
            room = limit - len(self._meta)
            if room <= 0:
                self._flush_meta()
                room = limit
            self._meta += mv[:room]
            mv = mv[room:]

    def inline(self, data: bytes) -> None:
        if not data:
            return
        self._flush_meta()
        self.tar_size += len(data)
        mv = memoryview(data)
        for i in range(0, len(mv), MAX_CHUNK):
            part = mv[i:i + MAX_CHUNK]
            self._put(bytes((INLINE,)) + _U32.pack(len(part)))
            self._put(part.tobytes())
            self.chunks += 1

    def file_ref(self, size: int, dirfd_index: int, name: str | bytes) -> None:
        if not 0 <= size <= MAX_FILE:
            raise ValueError(f"file size {size} out of range")
        if not 0 <= dirfd_index < MAX_DIRFDS:
            raise ValueError(f"dirfd index {dirfd_index} out of range")
        b = check_name(name)
        self._flush_meta()
        self.tar_size += size
        self._put(bytes((FILE,)) + _FILE_HDR.pack(size, dirfd_index, len(b)) + b)
        self.chunks += 1

    def flush(self) -> None:
        self._flush_meta()
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            flush()

    close = flush

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()


# -- reader ----------------------------------------------------------------------------------

def _read_exact(f: BinaryIO, n: int, offset: int, what: str, *, eof_ok: bool = False) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        b = f.read(n - got)
        if not b:
            if eof_ok and got == 0:
                return b""
            raise CorruptLayerError(
                f"truncated splitdirfdstream: end of stream inside {what} at offset "
                f"{offset + got}", hint=_HINT_CORRUPT)
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_chunks(f: BinaryIO) -> Iterator[Chunk]:
    """Decode and validate chunks from *f* until end of stream.

    Raises :class:`CorruptLayerError` for unknown types, oversized lengths and
    truncation, :class:`UnsafeLayerError` for hostile file names.  The dirfd
    index is only checked against the real list in :func:`open_ref`.
    """
    offset = 0
    while True:
        t = _read_exact(f, 1, offset, "a chunk type", eof_ok=True)
        if not t:
            return
        kind = t[0]
        start = offset
        offset += 1
        if kind in (METADATA, INLINE):
            (n,) = _U32.unpack(_read_exact(f, 4, offset, "a chunk length"))
            offset += 4
            if n > MAX_CHUNK:
                raise CorruptLayerError(
                    f"splitdirfdstream {KIND_NAMES[kind]} chunk at offset {start} is {n} "
                    f"bytes, over the {MAX_CHUNK}-byte limit", hint=_HINT_CORRUPT)
            data = _read_exact(f, n, offset, f"a {KIND_NAMES[kind]} chunk")
            offset += n
            yield Chunk(kind, data, n)
        elif kind == FILE:
            size, idx, n = _FILE_HDR.unpack(_read_exact(f, _FILE_HDR.size, offset,
                                                        "a file chunk header"))
            offset += _FILE_HDR.size
            if size > MAX_FILE:
                raise CorruptLayerError(
                    f"splitdirfdstream file chunk at offset {start} claims {size} bytes",
                    hint=_HINT_CORRUPT)
            if idx >= MAX_DIRFDS:
                raise CorruptLayerError(
                    f"splitdirfdstream file chunk at offset {start} has dirfd index {idx}",
                    hint=_HINT_CORRUPT)
            if n == 0 or n > MAX_NAME:
                raise CorruptLayerError(
                    f"splitdirfdstream file chunk at offset {start} has a name length of {n} "
                    f"(must be 1..{MAX_NAME})", hint=_HINT_CORRUPT)
            name = check_name(_read_exact(f, n, offset, "a file name"))
            offset += n
            yield Chunk(FILE, None, size, idx, name)
        else:
            raise CorruptLayerError(
                f"unknown splitdirfdstream chunk type 0x{kind:02x} at offset {start}",
                hint=_HINT_CORRUPT)


# -- resolving file references ---------------------------------------------------------------

_SYS_openat2 = 437          # same number on every architecture (generic syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
except OSError:  # pragma: no cover - no dynamic libc
    _libc = None

# flipped to False after the first ENOSYS; tests flip it to exercise the fallback walk
use_openat2: bool = _libc is not None

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _openat2(dirfd: int, name: bytes) -> int:
    assert _libc is not None
    how = _OpenHow(_OPEN_FLAGS, 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = int(_libc.syscall(ctypes.c_long(_SYS_openat2), ctypes.c_int(dirfd),
                           ctypes.c_char_p(name), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how))))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def _walk_open(dirfd: int, name: bytes) -> int:
    """openat() one component at a time; O_NOFOLLOW on each refuses every symlink."""
    comps = name.split(b"/")
    cur = dirfd
    try:
        for comp in comps[:-1]:
            nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=cur)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        return os.open(comps[-1], _OPEN_FLAGS, dir_fd=cur)
    finally:
        if cur != dirfd:
            os.close(cur)


def _is_symlink_on_path(dirfd: int, name: bytes) -> bool:
    comps = name.split(b"/")
    for i in range(1, len(comps) + 1):
        try:
            st = os.stat(b"/".join(comps[:i]), dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            return True
    return False


def open_ref(dirfds: Sequence[int], chunk: Chunk) -> int:
    """Open the regular file a FILE chunk refers to; return a read-only fd.

    The caller owns (and must close) the returned fd.
    """
    global use_openat2
    if chunk.kind != FILE or chunk.name is None:
        raise ValueError("open_ref needs a file chunk")
    if not 0 <= chunk.dirfd_index < len(dirfds):
        raise CorruptLayerError(
            f"splitdirfdstream file chunk uses dirfd index {chunk.dirfd_index} but only "
            f"{len(dirfds)} directory fds were supplied", hint=_HINT_CORRUPT)
    name = check_name(chunk.name)
    dirfd = dirfds[chunk.dirfd_index]
    shown = name.decode("utf-8", "backslashreplace")
    try:
        fd = -1
        if use_openat2:
            try:
                fd = _openat2(dirfd, name)
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                use_openat2 = False
        if fd < 0:
            fd = _walk_open(dirfd, name)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EXDEV) or (
                e.errno == errno.ENOTDIR and _is_symlink_on_path(dirfd, name)):
            raise UnsafeLayerError(
                f"splitdirfdstream reference {shown!r} crosses a symlink or leaves its directory",
                hint=_HINT_UNSAFE) from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise NotFoundError(
                f"file {shown!r} referenced by the splitdirfdstream does not exist",
                hint="the referenced object was removed or the wrong directory fd was passed"
            ) from None
        raise EnvironmentError_(f"cannot open referenced file {shown!r}: {e.strerror}",
                                hint="check permissions on the referenced directory") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeLayerError(
                f"splitdirfdstream reference {shown!r} is not a regular file",
                hint=_HINT_UNSAFE)
        if st.st_size != chunk.size:
            raise CorruptLayerError(
                f"referenced file {shown!r} is {st.st_size} bytes, the stream says "
                f"{chunk.size}", hint="the referenced object changed or is corrupt")
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- consumer: reassemble the tar ------------------------------------------------------------

def _copy_ref(fd: int, size: int, name: bytes, emit: Callable[[bytes], None]) -> None:
    left = size
    off = 0
    while left:
        b = os.pread(fd, min(_IO, left), off)
        if not b:
            raise CorruptLayerError(
                f"referenced file {name.decode('utf-8', 'backslashreplace')!r} shrank "
                f"while it was read", hint="do not modify referenced files during a copy")
        emit(b)
        off += len(b)
        left -= len(b)


def write_tar(chunks: Iterable[Chunk], dirfds: Sequence[int], out: BinaryIO) -> str:
    """Write the tar a chunk sequence stands for to *out*; return its ``sha256:`` digest."""
    h = hashlib.sha256()

    def emit(b: bytes) -> None:
        h.update(b)
        out.write(b)

    for c in chunks:
        if c.kind == FILE:
            fd = open_ref(dirfds, c)
            try:
                _copy_ref(fd, c.size, c.name or b"", emit)
            finally:
                os.close(fd)
        elif c.data:
            emit(c.data)
    return "sha256:" + h.hexdigest()


# -- producer: split a tar -------------------------------------------------------------------

class DataReader(Protocol):
    def __call__(self, n: int = ...) -> bytes: ...


PlaceFile = Callable[[TarEntry, DataReader], "tuple[int, str | bytes] | None"]


class _Tee:
    """Keep the raw bytes the tar reader consumes, so padding and trailer survive verbatim."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.buf = bytearray()
        self.base = 0               # stream offset of buf[0]

    def read(self, n: int) -> bytes:
        b = self._f.read(n)
        if b:
            self.buf += b
        return b

    def take(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the stream; drops everything before *end*."""
        if start < self.base or end > self.base + len(self.buf):
            raise AssertionError("tee window lost")  # a bug, not bad input
        out = bytes(self.buf[start - self.base:end - self.base])
        del self.buf[:end - self.base]
        self.base = end
        return out

    def drop(self, end: int) -> None:
        del self.buf[:end - self.base]
        self.base = end


def from_tar(tar_stream: BinaryIO, writer: StreamWriter,
             place_file: PlaceFile | None = None) -> str:
    """Split an uncompressed tar into *writer*; return the tar's ``sha256:`` digest.

    Header blocks, padding, the end-of-archive marker and anything after it go
    out verbatim as metadata.  For each regular file with data, *place_file*
    (if given) is called with the entry and a reader of its data: it either
    stores the whole content somewhere and returns ``(dirfd_index, name)`` for
    a file chunk, or returns None *without reading*, and the data is inlined.
    """
    h = hashlib.sha256()
    tee = _Tee(tar_stream)
    reader = TarReader(tee.read)
    pos = 0                         # first stream byte not yet emitted

    def meta(b: bytes) -> None:
        h.update(b)
        writer.metadata(b)

    for entry in reader:
        hdr_end = entry.offset + len(entry.raw_header)
        meta(tee.take(pos, hdr_end))    # previous member's padding + this header
        pos = hdr_end
        if entry.kind != "file" or entry.size == 0:
            continue
        def data(n: int = _IO) -> bytes:
            b = reader.read_data(n)
            h.update(b)
            tee.drop(reader.offset)     # data is hashed here, never buffered whole
            return b

        ref = place_file(entry, data) if place_file is not None else None
        if ref is not None:
            if reader.offset != pos + entry.size:
                raise RuntimeError(f"place_file returned a reference for {entry.name!r} "
                                   f"without consuming its {entry.size} bytes")
            idx, name = ref
            writer.file_ref(entry.size, idx, name)
        else:
            if reader.offset != pos:
                raise RuntimeError(f"place_file read {entry.name!r} and then declined it")
            while b := data():
                writer.inline(b)
        pos = reader.offset
    # end-of-archive marker, whatever follows it, and the read-ahead the reader still holds
    tail = tee.take(pos, tee.base + len(tee.buf))
    if tail:
        meta(tail)
    while True:
        b = tar_stream.read(_IO)
        if not b:
            break
        meta(b)
    writer.flush()
    return "sha256:" + h.hexdigest()


# -- importing referenced files --------------------------------------------------------------

def _copy_fallback(src: int, dst: int, size: int) -> None:
    off = 0
    try:
        while off < size:
            n = os.copy_file_range(src, dst, min(size - off, 1 << 30), off, off)
            if n == 0:
                break
            off += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                           errno.EBADF):
            raise
    while off < size:
        b = os.pread(src, min(_IO, size - off), off)
        if not b:
            break
        os.pwrite(dst, b, off)
        off += len(b)
    if off != size:
        raise CorruptLayerError("source file shrank while it was copied",
                                hint="do not modify files during an import")


def _ficlone(src: int, dst: int) -> bool:
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return True
    except OSError as e:
        # not reflink-capable, different filesystems, or an fd that cannot be cloned
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                       errno.ENOSYS, errno.EPERM, errno.EBADF, errno.ETXTBSY):
            return False
        raise


def import_file(src_fd: int, dst_dir_fd: int, name: str, *, mode: int = 0o644) -> bool:
    """Copy the whole of *src_fd* to *name* in *dst_dir_fd*; True when it was reflinked.

    Tries FICLONE (shares extents on btrfs/xfs/bcachefs), then copy_file_range,
    then read/write.  The file appears under *name* only when complete (written
    under a temporary name, then renamed); an existing *name* is replaced.
    """
    size = os.fstat(src_fd).st_size
    tmp = f".import-{os.getpid()}-{os.urandom(6).hex()}"
    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  mode, dir_fd=dst_dir_fd)
    try:
        try:
            cloned = _ficlone(src_fd, dst)
            if not cloned:
                _copy_fallback(src_fd, dst, size)
            os.fchmod(dst, mode)
        finally:
            os.close(dst)
        os.rename(tmp, name, src_dir_fd=dst_dir_fd, dst_dir_fd=dst_dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dst_dir_fd)
        except OSError:
            pass
        raise
    return cloned
